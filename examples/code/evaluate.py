"""The code model on its held-out functions: how many steps a canvas takes, and
how much of the source it writes back, for body generation and line infill.

    python examples/code/evaluate.py --model examples/code/model --data examples/code/data

Bodies (test.jsonl): the context and signature are the prompt; one canvas of
body is generated and scored token by token against the source's first
canvas of body (a position counts when it holds the source's token).

Lines (infill.jsonl): one line of a body, written with its length given,
between the code before it and the rest of the body (``stream_infill``), and
by the baseline that ignores the suffix (``stream_generate`` from the prefix,
cut at the same length). A line counts when it is written exactly; token
accuracy as for bodies.

Every problem is seeded (its index), so a run repeats. ``--settings`` takes
sampler settings as JSON (``{"fast": true}``) to score a variant.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.infill import last, stream_infill
from mlx_diffgemma.prompts import text_ids
from mlx_diffgemma.sampler_params import SamplerParams
from mlx_diffgemma.stats import Progress


def token_accuracy(written, source) -> float:
    """The share of the source's positions the written tokens match."""
    return float(np.mean([a == b for a, b in zip(list(written) + [None] * len(source), source)])) if source else 1.0


def bodies(model, tokenizer, rows, params):
    C = model.canvas_length
    steps, accuracy = [], []
    for i, row in enumerate(rows):
        source = tokenizer.encode(row["completion"], add_special_tokens=False)[:C]
        progress, written = Progress(), []
        for response in stream_generate(model, tokenizer, text_ids(tokenizer, row["prompt"]), C, seed=i, params=params):
            progress.update(response)
            written += response.token_ids
        steps += [progress.steps[c] for c in sorted(progress.steps)]
        accuracy.append(token_accuracy(written, source))
    return dict(
        problems=len(rows),
        token_accuracy=float(np.mean(accuracy)),
        median_steps_per_canvas=float(np.median(steps)),
        mean_steps_per_canvas=float(np.mean(steps)),
        steps_histogram=np.bincount(steps).tolist(),
    )


def lines(model, tokenizer, rows, params):
    scores = {"infill": [], "baseline": []}
    for i, row in enumerate(rows):
        middle = tokenizer.encode(row["middle"], add_special_tokens=False)
        prefix = text_ids(tokenizer, row["prefix"])
        suffix = tokenizer.encode(row["suffix"], add_special_tokens=False)
        result = last(stream_infill(model, tokenizer, prefix, suffix, len(middle), seed=i, params=params))
        filled = tokenizer.encode(result.text, add_special_tokens=False)
        written = []
        for response in stream_generate(model, tokenizer, prefix, len(middle), seed=i, params=params):
            written += response.token_ids
        written = written[: len(middle)]
        for name, ids in (("infill", filled), ("baseline", written)):
            scores[name].append((tokenizer.decode(ids) == row["middle"], token_accuracy(ids, middle)))
    return {
        name: dict(exact=float(np.mean([e for e, _ in s])), token_accuracy=float(np.mean([a for _, a in s])))
        for name, s in scores.items()
    } | {"problems": len(rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter-path", help="trained weights to load over --model (before fusing)")
    parser.add_argument("--data", type=Path, required=True, help="the directory build.py wrote")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N problems of each set")
    parser.add_argument("--settings", type=json.loads, default={}, help="sampler settings, as JSON")
    parser.add_argument("--skip-lines", action="store_true", help="score bodies only")
    args = parser.parse_args()
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    params = SamplerParams.resolve(model, **args.settings)

    def read(name):
        with open(args.data / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f][: args.limit]

    tic = time.perf_counter()
    result = {"settings": args.settings, "bodies": bodies(model, tokenizer, read("test.jsonl"), params)}
    if not args.skip_lines:
        result["lines"] = lines(model, tokenizer, read("infill.jsonl"), params)
    result["seconds"] = round(time.perf_counter() - tic, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
