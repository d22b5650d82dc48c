"""Exact-match accuracy of infilling and editing on the shift model's held-out problems.

    python examples/shift/evaluate_infill.py --model examples/shift/model --data examples/shift/data

builds an infill and an edit problem from each answer of ``test.jsonl``
(seeded, so the same problems every time: a gap of 1 to 16 characters at a
random place) and scores:

- infill with the gap's length given, and with the length chosen
  automatically (``stream_infill``'s candidate lengths and rule);
- the baseline, which ignores the suffix: ordinary generation from the
  prefix, cut at the given length, or (automatic) run to its end of sequence;
- edit of the answer with that span corrupted, the instruction (the
  question) in the user turn, against the same baseline: the span written
  from the text before it, the text after it pasted back.

A problem counts when the middle (infill) or the whole edited text (edit) is
exactly right. docs/infill.md has the table this prints.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.benchmark.work import read_problems
from mlx_diffgemma.chat_template import plain_ids, render
from mlx_diffgemma.infill import edit, last, stream_infill
from mlx_diffgemma.thinking import END_OF_TURN

sys.path.insert(0, str(Path(__file__).parent))
from build import ALPHABET  # noqa: E402

MAX_GAP = 16  # gaps of 1..16 characters (tokens: the tokenizer is one per character)
METHODS = (
    "infill, length given",
    "infill, automatic length",
    "baseline, length given",
    "baseline, automatic length",
    "edit",
    "baseline edit",
)


def gap(rng: np.random.Generator, answer: str) -> tuple:
    """Where the problem's gap is: (start, length), at least one character before the end."""
    length = int(rng.integers(1, MAX_GAP + 1))
    start = int(rng.integers(0, len(answer) - length))
    return start, length


def corrupt(rng: np.random.Generator, text: str, start: int, end: int) -> str:
    """The span replaced by other characters of the alphabet, all wrong."""
    wrong = [
        ALPHABET[(ALPHABET.index(c) + int(rng.integers(1, len(ALPHABET)))) % len(ALPHABET)] for c in text[start:end]
    ]
    return text[:start] + "".join(wrong) + text[end:]


def baseline(model, tokenizer, prefix_ids, max_tokens, seed):
    text = ""
    for r in stream_generate(model, tokenizer, prefix_ids, max_tokens, seed=seed):
        text += r.text
    return text.removesuffix(END_OF_TURN)


def run(model, tokenizer, problems, seed: int = 0):
    """Per method: [exactly right, problems], mean denoising steps (infill) and seconds per problem."""
    counts = defaultdict(lambda: [0, 0])
    steps = defaultdict(int)
    seconds = defaultdict(float)
    end_of_turn = list(tokenizer.encode(END_OF_TURN, add_special_tokens=False))
    for i, (question, answer) in enumerate(problems):
        rng = np.random.default_rng([seed, i])
        start, length = gap(rng, answer)
        middle = answer[start : start + length]
        prompt = render(tokenizer, [{"role": "user", "content": question}], True)
        prefix = prompt + plain_ids(tokenizer, answer[:start])
        suffix = plain_ids(tokenizer, answer[start + length :]) + end_of_turn

        def count(method, ok, tic, n_steps=0):
            counts[method][0] += bool(ok)
            counts[method][1] += 1
            steps[method] += n_steps
            seconds[method] += time.perf_counter() - tic

        for method, n in (("infill, length given", length), ("infill, automatic length", None)):
            tic = time.perf_counter()
            result = last(stream_infill(model, tokenizer, prefix, suffix, n, seed=seed + i))
            count(method, result.text == middle, tic, result.denoising_steps)
        tic = time.perf_counter()
        span = baseline(model, tokenizer, prefix, length, seed + i)
        count("baseline, length given", span == middle, tic)
        tic = time.perf_counter()
        count("baseline, automatic length", baseline(model, tokenizer, prefix, 256, seed + i) == middle, tic)

        wrong = corrupt(rng, answer, start, start + length)
        tic = time.perf_counter()
        edited = edit(model, tokenizer, wrong, [(start, start + length)], question, seed=seed + i)
        count("edit", edited.text == answer and edited.spans == [(start, start + length)], tic)
        # The baseline's edit: the span written from the text before it (the
        # generation above), the text after it pasted back.
        count("baseline edit", answer[:start] + span + answer[start + length :] == answer, time.perf_counter())
    return counts, steps, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    path = args.data / f"{args.split}.jsonl"
    if not path.exists():
        sys.exit(f"error: {path}: missing (build it: python examples/shift/build.py --data {args.data})")
    model, tokenizer = load(args.model)
    counts, steps, seconds = run(model, tokenizer, read_problems(path, args.limit), args.seed)
    if args.json:
        numbers = {
            m: {"correct": c, "problems": n, "steps": steps[m] / n, "seconds": seconds[m] / n}
            for m, (c, n) in counts.items()
        }
        print(json.dumps(numbers))
        return
    print("| method | exact match | denoising steps | seconds per problem |")
    print("|---|---|---|---|")
    for method in METHODS:
        correct, n = counts[method]
        n_steps = f"{steps[method] / n:.2f}" if steps[method] else ""
        print(f"| {method} | {correct}/{n} ({100 * correct / n:.1f}%) | {n_steps} | {seconds[method] / n:.3f} |")


if __name__ == "__main__":
    main()
