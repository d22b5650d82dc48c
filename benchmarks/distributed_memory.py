"""What each process holds when the released model at 4 bits is split over processes.

    python benchmarks/distributed_memory.py --write /tmp/released-4bit
    python benchmarks/distributed_memory.py --load /tmp/released-4bit
    mlx.launch --backend ring -n 2 python benchmarks/distributed_memory.py --load /tmp/released-4bit [--pipeline]

``--write`` lays out a checkpoint exactly as ``mlx_diffgemma.convert --q-bits
4`` would write the released model (its tensor names and shapes from
tests/data/diffusiongemma-26B-A4B-it/weights.tsv, the default mixed recipe),
holding zeros (sparse files: no disk space, no time to write): nothing
here can download the real weights, and loading costs the same bytes
whatever they hold. ``--load`` loads it (split over the
processes when launched by mlx.launch) and each process prints one JSON line:
the bytes of the weights it holds, MLX's peak and active memory, and the
process's peak resident set.
"""

import argparse
import json
import resource
import struct
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffgemma import distributed
from mlx_diffgemma.convert_weights import _shard_names, output_config, plan_conversion
from mlx_diffgemma.recipes import quantization_settings
from mlx_diffgemma.shards import Slot
from mlx_diffgemma.utils import load_model

RELEASED = Path(__file__).resolve().parents[1] / "tests" / "data" / "diffusiongemma-26B-A4B-it"


def released_slots():
    """The released checkpoint's tensors as the converter sees them (bf16, shapes only)."""
    slots = {}
    for line in (RELEASED / "weights.tsv").read_text().splitlines()[1:]:
        name, shape = line.split("\t")
        slots[name] = Slot(RELEASED / "model.safetensors", "BF16", tuple(json.loads(shape)), 0)
    return slots


def write_sparse_shard(path: Path, tensors):
    """A safetensors file whose data is all zeros, left as a hole (no disk, no time)."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        nbytes = Slot(path, dtype, tuple(shape), 0).nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def write_layout(out: Path, bits: int):
    config = json.loads((RELEASED / "config.json").read_text())
    plan = plan_conversion(config, released_slots(), quantization_settings(q_bits=bits))
    out.mkdir(parents=True, exist_ok=True)
    specs = {name: (dtype, shape) for name, dtype, shape in plan.outputs}
    names = _shard_names(plan)
    weight_map = {}
    for i, shard in enumerate(names):
        file_name = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        write_sparse_shard(out / file_name, [(n, *specs[n]) for n in shard])
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(output_config(config, plan, None), indent=2))
    print(f"wrote {out}: {plan.nbytes / 1e9:.2f} GB in {len(names)} shards", flush=True)


def load_and_report(path: Path, pipeline: bool):
    group = distributed.init()
    split = {}
    if group.size() > 1:
        split = dict(pipeline_group=group) if pipeline else dict(tensor_group=group)
    mx.reset_peak_memory()
    model = load_model(path, **split)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    report = dict(
        rank=group.rank(),
        processes=group.size(),
        split=None if group.size() == 1 else ("pipeline" if pipeline else "tensor"),
        layers=len(model.layers),
        weights_gb=round(held / 1e9, 3),
        peak_gb=round(mx.get_peak_memory() / 1e9, 3),
        active_gb=round(mx.get_active_memory() / 1e9, 3),
        max_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
    )
    print(json.dumps(report), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the released 4-bit layout here")
    parser.add_argument("--load", type=Path, metavar="DIR", help="load it and report memory")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--pipeline", action="store_true", help="split the layers, not the heads and experts")
    args = parser.parse_args()
    if args.write is None and args.load is None:
        parser.error("give --write DIR or --load DIR")
    if args.write is not None:
        if (args.write / "config.json").exists():
            sys.exit(f"{args.write}: already holds a checkpoint")
        write_layout(args.write, args.bits)
    if args.load is not None:
        load_and_report(args.load, args.pipeline)


if __name__ == "__main__":
    main()
