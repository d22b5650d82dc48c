"""Exact-match accuracy of a model on the shift task, and how fast its canvases converge.

    python examples/shift/evaluate.py --model examples/shift/model --data examples/shift/data

generates an answer to every problem of ``test.jsonl`` (one at a time, seed
``--seed`` + problem index) with the sampler settings of the model's
generation_config.json (the released checkpoint's) unless flags override
them, and prints the share of answers that are exactly right, the mean
denoising steps per canvas, the tokens per forward and the FLOPs per
committed token. ``python -m mlx_diffgemma.benchmark --model ... --data ...``
does the same for every sampler variant in one table.
"""

import argparse
import json
import sys
from pathlib import Path

from mlx_diffgemma import load
from mlx_diffgemma.benchmark.work import evaluate, read_problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--adapter-path")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-denoising-steps", type=int)
    parser.add_argument("--fast", action="store_true", help="the fast setting instead of the reference sampler")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    path = args.data / f"{args.split}.jsonl"
    if not path.exists():
        sys.exit(f"error: {path}: missing (build it: python examples/shift/build.py --data {args.data})")
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    sampler = {"max_denoising_steps": args.max_denoising_steps, "fast": args.fast or None}
    s = evaluate(model, tokenizer, read_problems(path, args.limit), seed=args.seed, **sampler)
    if args.json:
        print(json.dumps(s))
    else:
        print(f"Exact match: {s['exact']}/{s['problems']} ({100 * s['accuracy']:.1f}%)")
        print(f"Denoising steps per canvas: {s['steps_per_canvas']:.2f} over {s['canvases']} canvases")
        print(f"Tokens per forward: {s['tokens_per_forward']:.2f}")
        print(f"FLOPs per committed token: {s['flops_per_token'] / 1e6:.2f} M")


if __name__ == "__main__":
    main()
