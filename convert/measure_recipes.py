"""Logit error and real-model size of each quantization recipe.

    python convert/measure_recipes.py [--seeds 4] [--bits 4 3 8]

Error: each recipe converts tiny fp32 checkpoints (tests/convert_reference.py:
the real model's structure at toy widths, with a trained-like router margin)
through `mlx_diffgemma.convert`; `load` reads the result. Logits come from
`encode` on a 24-token prompt (longer than the sliding window) and `denoise`
on a 16-token canvas, twice: the first step, then a self-conditioned step fed
the first step's logits / 0.6 (through the embedding table). Against the
float model's logits: RMS and max abs difference (logits are soft-capped at
30; the float logits' RMS is about 2), and top-1 agreement over the canvas
positions. Mean over seeds (checkpoints) and 4 prompts each.

Size: the released checkpoint's tensors
(tests/data/diffusiongemma-26B-A4B-it/weights.tsv) planned by the converter
itself, in bfloat16: exact bytes of weights, scales and biases.

Rows below the named recipes are variants for choosing the default: other
group sizes and float formats for the experts, the mixed recipe with the
embedding kept in bf16 or the router at 8-bit, and each piece alone at the
requested bits (everything else float), which shows where the error comes
from. (The toy's widths are 64, so its group-128 row is its group-64 row.)

Needs the test extras (torch, transformers): pip install -e '.[test]'.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from mlx_diffgemma.convert import convert
from mlx_diffgemma.convert_weights import plan_conversion
from mlx_diffgemma.recipes import PIECES, RECIPES, quantization_settings
from mlx_diffgemma.shards import Slot
from mlx_diffgemma.utils import load_model

ROOT = Path(__file__).resolve().parents[1]
# The released checkpoint's configs and tensor listing, kept with the tests.
RELEASED = ROOT / "tests/data/diffusiongemma-26B-A4B-it"


def load_test_helper(name: str):
    """tests/<name>.py, imported from its file as module ``name``.

    The tests' checkpoint builders are shared with the tests rather than copied,
    so the measurement runs on exactly what test_convert.py checks. They import
    each other by bare name (pytest's conftest puts tests/ on sys.path); being
    registered in sys.modules under that name does the same here.
    """
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load_test_helper("reference")  # imported by convert_reference
convert_reference = load_test_helper("convert_reference")
build_quantization_reference = convert_reference.build_quantization_reference
logit_error = convert_reference.logit_error
quantization_logits = convert_reference.quantization_logits


def released_plan_bytes(options: dict) -> int:
    """Bytes the converter writes for the released checkpoint (bf16) with ``options``."""
    config = json.loads((RELEASED / "config.json").read_text())
    slots = {}
    for line in (RELEASED / "weights.tsv").read_text().splitlines()[1:]:
        name, shape = line.split("\t")
        slots[name] = Slot(Path("weights.tsv"), "BF16", tuple(json.loads(shape)), 0)
    settings = None
    if options:
        settings = quantization_settings(options.get("q_bits"), options.get("q_group_size"), options.get("q_mode"))
    plan = plan_conversion(config, slots, settings, options.get("recipe") or "mixed", dtype="bfloat16")
    return plan.nbytes


def variants(bits_list):
    """(label, bits shown, convert() options)."""
    rows = [(name, bits, dict(q_bits=bits, recipe=name)) for bits in bits_list for name in RECIPES]
    bits = bits_list[0]
    mixed = RECIPES["mixed"]
    rows += [
        ("mixed, group 32", bits, dict(q_bits=bits, q_group_size=32)),
        ("mixed, group 128", bits, dict(q_bits=bits, q_group_size=128)),
        ("mixed, mxfp4 experts", 4, dict(q_mode="mxfp4")),
        ("mixed, nvfp4 experts", 4, dict(q_mode="nvfp4")),
        ("mixed, embedding bf16", bits, dict(q_bits=bits, recipe=dict(mixed, embedding=None))),
        ("mixed, router 8-bit", bits, dict(q_bits=bits, recipe=dict(mixed, router="high"))),
    ]
    for p in PIECES:
        only = dict(dict.fromkeys(PIECES, None), **{p: "requested"})
        rows.append((f"only {p}", bits, dict(q_bits=bits, recipe=only)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 8])
    args = parser.parse_args()

    rows = variants(args.bits)
    results = {i: [] for i in range(len(rows))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            src = tmp / f"src{seed}"
            build_quantization_reference(src, seed=seed)
            ref = quantization_logits(load_model(src), seed)
            for i, (_, _, options) in enumerate(rows):
                out = convert(str(src), str(tmp / f"q{seed}-{i}"), progress=False, **options)
                results[i].append(logit_error(quantization_logits(load_model(out), seed), ref))

    bf16 = released_plan_bytes({})
    print(f"Real model in bf16 (text weights): {bf16 / 1e9:.2f} GB")
    print(f"{'recipe':<24}{'bits':>5}{'logit RMS':>11}{'max abs':>9}{'top-1':>8}{'real size':>16}")
    for i, (label, bits, options) in enumerate(rows):
        rms, mx_abs, top1 = np.mean(results[i], axis=0)
        size = released_plan_bytes(options)
        print(f"{label:<24}{bits:>5}{rms:>11.4f}{mx_abs:>9.3f}{top1:>8.1%}{size / 1e9:>9.2f} GB")


if __name__ == "__main__":
    # convert() reports each conversion; only the table (or --help) is wanted here,
    # also when main() stops early.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            main()
    finally:
        print("\n".join(line for line in log.getvalue().splitlines() if not line.startswith("[INFO]")))
