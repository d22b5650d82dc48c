"""Exact-match accuracy of infilling and editing on the shift model's held-out problems.

    python examples/shift/evaluate_infill.py --model examples/shift/model --data examples/shift/data

builds infill and edit problems from ``test.jsonl`` (seeded, so the same
problems every time) and scores, for each task:

- infill with the gap's length given, and with the length chosen
  automatically (``stream_infill``'s candidate lengths and rule);
- the baseline, which ignores the suffix: ordinary generation from the
  prefix, cut at the given length, or (automatic) run to its end of sequence;
- edit of a corrupted span with the instruction (the question) in the user
  turn, against the same baseline: the span regenerated from the text before
  it, the text after it pasted back.

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
from mlx_diffgemma.chat_template import plain_ids, render
from mlx_diffgemma.infill import edit, last, stream_infill
from mlx_diffgemma.thinking import END_OF_TURN

sys.path.insert(0, str(Path(__file__).parent))
from build import ALPHABET, TWICE_PROMPT, TWICE_WORD  # noqa: E402
from evaluate import read_problems  # noqa: E402

MAX_GAP = 16  # gaps of 1..16 characters (tokens: the tokenizer is one per character)


def task_of(question: str) -> str:
    return "twice" if question == TWICE_PROMPT else "shift"


def gap(rng: np.random.Generator, question: str, answer: str) -> tuple:
    """Where the problem's gap is: (start, length). In the twice task it lies in
    the first word, which nothing before it determines."""
    room = TWICE_WORD if task_of(question) == "twice" else len(answer) - 1
    length = int(rng.integers(1, min(MAX_GAP, room) + 1))
    start = int(rng.integers(0, room - length + 1))
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


def run(model, tokenizer, problems, seed: int = 0, methods=None):
    """{(task, method): [correct, total]} over ``problems``."""
    counts = defaultdict(lambda: [0, 0])
    steps = defaultdict(int)
    seconds = defaultdict(float)
    end_of_turn = list(tokenizer.encode(END_OF_TURN, add_special_tokens=False))
    for i, (question, answer) in enumerate(problems):
        task = task_of(question)
        rng = np.random.default_rng([seed, i])
        start, length = gap(rng, question, answer)
        middle = answer[start : start + length]
        prompt = render(tokenizer, [{"role": "user", "content": question}], True)
        prefix = prompt + plain_ids(tokenizer, answer[:start])
        suffix = plain_ids(tokenizer, answer[start + length :]) + end_of_turn

        def count(method, ok, tic, n_steps=0, task=task):
            counts[task, method][0] += bool(ok)
            counts[task, method][1] += 1
            steps[task, method] += n_steps
            seconds[task, method] += time.perf_counter() - tic

        for method, n in (("infill, length given", length), ("infill, automatic length", None)):
            tic = time.perf_counter()
            result = last(stream_infill(model, tokenizer, prefix, suffix, n, seed=seed + i))
            count(method, result.text == middle, tic, result.denoising_steps)
        tic = time.perf_counter()
        count("baseline, length given", baseline(model, tokenizer, prefix, length, seed + i) == middle, tic)
        tic = time.perf_counter()
        count("baseline, automatic length", baseline(model, tokenizer, prefix, 256, seed + i) == middle, tic)

        wrong = corrupt(rng, answer, start, start + length)
        tic = time.perf_counter()
        edited = edit(model, tokenizer, wrong, [(start, start + length)], question, seed=seed + i)
        count("edit", edited.text == answer and edited.spans == [(start, start + length)], tic)
        tic = time.perf_counter()
        span = baseline(model, tokenizer, prefix, length, seed + i)
        count("baseline edit", answer[:start] + span + answer[start + length :] == answer, tic)
    return counts, steps, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the first N problems of each task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    path = args.data / f"{args.split}.jsonl"
    if not path.exists():
        sys.exit(f"error: {path}: missing (build it: python examples/shift/build.py --data {args.data})")
    problems = read_problems(path)
    by_task = defaultdict(list)
    for p in problems:
        by_task[task_of(p[0])].append(p)
    chosen = [p for task in ("shift", "twice") for p in by_task[task][: args.limit]]
    model, tokenizer = load(args.model)
    counts, steps, seconds = run(model, tokenizer, chosen, args.seed)
    if args.json:
        numbers = {
            f"{t}/{m}": {"correct": c, "problems": n, "steps": steps[t, m] / n, "seconds": seconds[t, m] / n}
            for (t, m), (c, n) in counts.items()
        }
        print(json.dumps(numbers))
        return
    print("| task | method | exact match | denoising steps | seconds per problem |")
    print("|---|---|---|---|---|")
    for (task, method), (correct, n) in counts.items():
        n_steps = f"{steps[task, method] / n:.2f}" if steps[task, method] else ""
        print(
            f"| {task} | {method} | {correct}/{n} ({100 * correct / n:.1f}%) | {n_steps} | "
            f"{seconds[task, method] / n:.3f} |"
        )


if __name__ == "__main__":
    main()
