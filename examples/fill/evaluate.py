"""The fill model on its held-out problems: how many steps a canvas takes and
how often the answer is right, for whole answers and for infill.

    python examples/fill/evaluate.py --model examples/fill/model --data examples/fill/data

Answers (test.jsonl): the question through the chat template and
``stream_generate``; the answer is right when it solves the puzzle
(``build.score``: every row a permutation of the letters keeping the given
ones), and row accuracy is the share of rows that do. Steps per canvas are
the sampler's.

Infill (infill.jsonl): 1 to 4 characters of one row, from a dot on, cut out
of a right answer, written with the gap's length given between the text
before and after it (``stream_infill``), and by the baseline that ignores
the suffix (``stream_generate`` from the prefix, cut at the same length). A
gap counts when the answer with it filled in solves the puzzle.

Every problem is seeded (its index), so a run repeats. ``--settings`` takes
sampler settings as JSON (``{"fast": true}``) to score a variant.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.benchmark.work import read_problems
from mlx_diffgemma.chat_template import plain_ids, render
from mlx_diffgemma.infill import last, stream_infill
from mlx_diffgemma.sampler_params import SamplerParams
from mlx_diffgemma.stats import Progress
from mlx_diffgemma.thinking import END_OF_TURN


def _build():
    # build.py under its own name: examples/shift has a "build" module too.
    spec = importlib.util.spec_from_file_location("fill_build", Path(__file__).with_name("build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


score = _build().score


def answers(model, tokenizer, problems, params):
    steps, right, rows, of = [], 0, 0, 0
    for i, (question, _) in enumerate(problems):
        prompt = render(tokenizer, [{"role": "user", "content": question}])
        progress, text = Progress(), ""
        for response in stream_generate(model, tokenizer, prompt, model.canvas_length, seed=i, params=params):
            progress.update(response)
            text += response.text
        steps += [progress.steps[c] for c in sorted(progress.steps)]
        s = score(question, text.removesuffix(END_OF_TURN).strip())
        right += s["right"]
        rows += s["rows"]
        of += s["of"]
    return dict(
        problems=len(problems),
        right=right / len(problems),
        row_accuracy=rows / of,
        median_steps_per_canvas=float(np.median(steps)),
        mean_steps_per_canvas=float(np.mean(steps)),
        steps_histogram=np.bincount(steps).tolist(),
    )


def gaps(model, tokenizer, rows, params):
    """Infill with the suffix against the baseline without it, same length."""
    end_of_turn = tokenizer.encode(END_OF_TURN, add_special_tokens=False)
    right = {"infill": 0, "baseline": 0}
    steps = []
    for i, row in enumerate(rows):
        prompt = render(tokenizer, [{"role": "user", "content": row["question"]}])
        prefix = prompt + plain_ids(tokenizer, row["prefix"])
        suffix = plain_ids(tokenizer, row["suffix"]) + end_of_turn
        length = len(plain_ids(tokenizer, row["middle"]))
        result = last(stream_infill(model, tokenizer, prefix, suffix, length, seed=i, params=params))
        steps.append(result.denoising_steps)
        written = []
        for response in stream_generate(model, tokenizer, prefix, length, seed=i, params=params):
            written += response.token_ids
        for name, middle in (("infill", result.text), ("baseline", tokenizer.decode(written[:length]))):
            right[name] += score(row["question"], row["prefix"] + middle + row["suffix"])["right"]
    return {name: n / len(rows) for name, n in right.items()} | {
        "problems": len(rows),
        "infill_mean_steps": float(np.mean(steps)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--adapter-path", help="trained weights to load over --model (before fusing)")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data", help="build.py's output")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N problems of each set")
    parser.add_argument("--settings", type=json.loads, default={}, help="sampler settings, as JSON")
    parser.add_argument("--skip-infill", action="store_true", help="score whole answers only")
    args = parser.parse_args()
    for name in ("test.jsonl", "infill.jsonl"):
        if not (args.data / name).is_file():
            sys.exit(f"error: {args.data / name}: missing (build it: python examples/fill/build.py --data {args.data})")
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    params = SamplerParams.resolve(model, **args.settings)
    tic = time.perf_counter()
    result = {"settings": args.settings}
    result["answers"] = answers(model, tokenizer, read_problems(args.data / "test.jsonl", args.limit), params)
    if not args.skip_infill:
        with open(args.data / "infill.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][: args.limit]
        result["infill"] = gaps(model, tokenizer, rows, params)
    result["seconds"] = round(time.perf_counter() - tic, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
