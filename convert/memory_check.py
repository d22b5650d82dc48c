"""Peak memory of a 4-bit conversion does not grow with the number of layers.

    python convert/memory_check.py [--layers 2 4] [--dir /tmp] [--keep]

Builds synthetic bf16 checkpoints in the Hugging Face layout with the real
model's widths (hidden 2816, 128 experts of 704, dense MLP 2112, vocabulary
262,144, sliding and full attention layers of the released shapes, from
tests/data/diffusiongemma-26B-A4B-it/weights.tsv), one shard per layer, written tensor by
tensor with the converter's streaming writer (so building them is bounded
too). Each is converted at 4 bits (default recipe) in its own process; the
parent reads the child's peak resident memory (ru_maxrss from wait4) and the
child reports MLX's peak memory. The check fails if the peaks differ by 0.5 GB
or more. The synthetic checkpoints and outputs are deleted afterwards.

Needs about 13 GB of free disk for 2 and 4 layers (4.8 + 8.05 GB of bf16).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_diffgemma.shards import ShardWriter

# The released checkpoint's configs and tensor listing, kept with the tests.
RELEASED = Path(__file__).resolve().parents[1] / "tests/data/diffusiongemma-26B-A4B-it"

LIMIT_GB = 0.5
# A block of random bf16 values cycled through every tensor: the values do not
# matter for memory, and generating 13 GB of fresh random numbers is slow.
NOISE = mx.random.normal((16 << 20,), scale=0.02).astype(mx.bfloat16)
mx.eval(NOISE)


def released_shapes():
    shapes = {}
    for line in (RELEASED / "weights.tsv").read_text().splitlines()[1:]:
        name, shape = line.split("\t")
        shapes[name] = json.loads(shape)
    return shapes


def synthetic_tensors(layers: int):
    """(shard name, [(tensor name, shape)]) for a model with ``layers`` layers:
    sliding layers shaped like layer 0, the last (full attention) like layer 5."""
    shapes = released_shapes()

    def layer_tensors(src: int, dst: int):
        out = []
        for prefix in ("model.decoder.layers.", "model.encoder.language_model.layers."):
            head = f"{prefix}{src}."
            for name, shape in shapes.items():
                if name.startswith(head):
                    out.append((f"{prefix}{dst}.{name[len(head) :]}", shape))
        return out

    top = [(n, s) for n, s in shapes.items() if n.startswith("model.decoder.") and ".layers." not in n]
    shards = [("model-top.safetensors", top)]
    for i in range(layers):
        src = 5 if i == layers - 1 else 0
        shards.append((f"model-layer{i:02d}.safetensors", layer_tensors(src, i)))
    return shards


def write_checkpoint(path: Path, layers: int):
    path.mkdir(parents=True)
    config = json.loads((RELEASED / "config.json").read_text())
    text = config["text_config"]
    text["num_hidden_layers"] = layers
    text["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(RELEASED / "generation_config.json", path)
    weight_map = {}
    for shard, tensors in synthetic_tensors(layers):
        writer = ShardWriter(path / shard, [(n, "BF16", tuple(s)) for n, s in tensors])
        for name, shape in tensors:
            slot = writer.slots[name]
            rows_per_block = max(1, NOISE.size // (slot.row_bytes // 2))
            for start in range(0, slot.rows, rows_per_block):
                stop = min(start + rows_per_block, slot.rows)
                count = (stop - start) * (slot.row_bytes // 2)
                block_shape = (stop - start, *shape[1:]) if len(shape) > 1 else tuple(shape)
                values = NOISE[:count].reshape(block_shape)
                if name.endswith(("norm.weight", "scale", "layer_scalar")):
                    values = mx.ones(block_shape, mx.bfloat16)
                writer.write_rows(name, start, values)
            weight_map[name] = shard
        writer.close()
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


CHILD = """
import sys, time
import mlx.core as mx
from mlx_diffgemma.convert import convert
tic = time.perf_counter()
convert(sys.argv[1], sys.argv[2], q_bits=4, progress=False)
print("RESULT", mx.get_peak_memory(), time.perf_counter() - tic)
"""


def measure(src: Path, out: Path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out)], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"conversion of {src} failed ({proc.returncode})")
    result = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    _, mlx_peak, seconds = result.split()
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    return usage.ru_maxrss * 1024, int(mlx_peak), float(seconds), out_bytes  # ru_maxrss: KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dir", default=None, help="Where to build the checkpoints.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="diffgemma-memcheck-", dir=args.dir))
    rows = []
    try:
        for layers in args.layers:
            src = work / f"synthetic-{layers}-layers"
            tic = time.perf_counter()
            write_checkpoint(src, layers)
            src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            built = time.perf_counter() - tic
            rss, mlx_peak, seconds, out_bytes = measure(src, work / f"out-{layers}")
            rows.append((layers, src_bytes, rss, mlx_peak, seconds, out_bytes))
            print(
                f"{layers} layers: source {src_bytes / 1e9:.2f} GB (built in {built:.0f} s), "
                f"4-bit output {out_bytes / 1e9:.2f} GB in {seconds:.0f} s; peak RSS "
                f"{rss / 1e9:.2f} GB, MLX peak {mlx_peak / 1e9:.2f} GB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(src)
                shutil.rmtree(work / f"out-{layers}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rss_growth = rows[-1][2] - rows[0][2]
    mlx_growth = rows[-1][3] - rows[0][3]
    print(
        f"growth from {rows[0][0]} to {rows[-1][0]} layers: RSS {rss_growth / 1e9:+.3f} GB, "
        f"MLX peak {mlx_growth / 1e9:+.3f} GB (limit {LIMIT_GB} GB)"
    )
    ok = rss_growth < LIMIT_GB * 1e9 and mlx_growth < LIMIT_GB * 1e9
    print("OK" if ok else "FAIL: peak memory grows with the number of layers")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
