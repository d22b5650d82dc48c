"""Build the "fill" task: its data, and a randomly initialised model to train on it.

The task, a constraint fill: the user sends ``ROWS`` rows of the letters
``LETTERS``, each row a permutation of them with ``MIN_BLANKS`` to
``MAX_BLANKS`` letters hidden as dots; the answer is the rows with every dot
filled so that each row again holds every letter exactly once. A row's
missing letters may go into its dots in any order, and the training
answers put them in a uniformly random one: the prompt fixes which letters
a row lacks but not where each goes, and every choice constrains the others
(a letter placed in one dot cannot go in another of its row). That is the
released model's kind of canvas, tokens that depend on each other, so the
entropy-bounded sampler settles it over many steps; examples/shift, whose
answer follows from the prompt position by position, settles in 2. The
given letters are a copy at a fixed distance, as in examples/shift, which a
small model learns quickly.

Answers are checkable without a reference: an answer is right when every
row is a permutation of the letters that keeps the given ones
(``score``). Infill problems cut 1 to ``MAX_GAP`` characters, starting at a
dot, out of a right answer: the suffix then says which missing letters the
rest of the row uses, which the prefix alone cannot.

    python examples/fill/build.py --data examples/fill/data --init examples/fill/init

writes train/valid/test.jsonl (chat messages), infill.jsonl (the question,
and the prefix, middle and suffix of a right answer) and a model directory
with the real layout (sliding and full attention layers, experts with top-2
routing, self-conditioning) at small widths, canvas 64, random weights,
examples/shift's character-level tokenizer with Gemma 4's control tokens at
their real ids, and the released checkpoint's sampler settings. Everything
is seeded: the same files every time.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np


def _shift_build():
    # examples/shift/build.py under its own name: this file is "build" too.
    path = Path(__file__).resolve().parents[1] / "shift" / "build.py"
    spec = importlib.util.spec_from_file_location("shift_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shift = _shift_build()

LETTERS = "abcdefghijkl"
BLANK = "."
ROWS = 4  # 4 rows of 12 and their newlines, then <turn|>: 52 tokens, one canvas
MIN_BLANKS, MAX_BLANKS = 2, 6  # per row
MAX_GAP = 4
CANVAS_LENGTH = 64
SPLITS = {"train": (24_000, 0), "valid": (64, 1), "test": (200, 2)}  # problems, seed
INFILL = (200, 3)

# The shift model's config (rope, norms, ids, widths), deeper, with a sliding
# window shorter than an example (about 130 tokens) so both kinds of layer matter.
TEXT_CONFIG = dict(
    shift.TEXT_CONFIG,
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    sliding_window=64,
)


def problem(rng: np.random.Generator) -> tuple:
    """(question, one right answer): rows with dots, and the dots filled at random."""
    puzzle, answer = [], []
    for _ in range(ROWS):
        row = list(rng.permutation(list(LETTERS)))
        blanks = sorted(rng.choice(len(row), int(rng.integers(MIN_BLANKS, MAX_BLANKS + 1)), replace=False))
        missing = rng.permutation([row[i] for i in blanks]).tolist()
        puzzle.append("".join(BLANK if i in blanks else c for i, c in enumerate(row)))
        filled = list(row)
        for i, c in zip(blanks, missing):
            filled[i] = c
        answer.append("".join(filled))
    return "\n".join(puzzle), "\n".join(answer)


def score(question: str, answer: str) -> dict:
    """Whether ``answer`` solves ``question``, and how many of its rows do: a
    row is right when it is a permutation of LETTERS that keeps the row's
    given letters."""
    rows = answer.split("\n")
    puzzle = question.split("\n")
    right = 0
    for i, given in enumerate(puzzle):
        row = rows[i] if i < len(rows) else ""
        right += (
            sorted(row) == sorted(LETTERS)
            and len(row) == len(given)
            and all(g in (BLANK, c) for g, c in zip(given, row))
        )
    return {"right": right == len(puzzle) and len(rows) == len(puzzle), "rows": right, "of": len(puzzle)}


def check(question: str, written: str, answer: str) -> float:
    """The benchmark's check (``--metric examples/fill/build.py:check``): the
    share of rows solved, by any right filling, not only the reference's ``answer``."""
    s = score(question, written)
    return s["rows"] / s["of"]


def infill_problem(rng: np.random.Generator) -> dict:
    """A right answer with 1 to MAX_GAP characters cut out of one row, from a dot on."""
    question, answer = problem(rng)
    width = len(LETTERS) + 1  # a row and its newline
    dots = [i for i, c in enumerate(question) if c == BLANK]
    start = int(rng.choice(dots))
    row_end = (start // width) * width + len(LETTERS)
    length = int(rng.integers(1, min(MAX_GAP, row_end - start) + 1))
    return {
        "question": question,
        "prefix": answer[:start],
        "middle": answer[start : start + length],
        "suffix": answer[start + length :],
    }


def write_data(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for split, (count, seed) in SPLITS.items():
        rng = np.random.default_rng(seed)
        lines = []
        for _ in range(count):
            question, answer = problem(rng)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"messages": messages}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    count, seed = INFILL
    rng = np.random.default_rng(seed)
    (out / "infill.jsonl").write_text("".join(json.dumps(infill_problem(rng)) + "\n" for _ in range(count)))


def write_initial_model(out: Path, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    text, vocab_size = shift.tokenizer_json()
    shift.write_tokenizer_files(out, text, TEXT_CONFIG["max_position_embeddings"])
    shift.write_model(out, TEXT_CONFIG, CANVAS_LENGTH, vocab_size, seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="write train/valid/test/infill.jsonl here")
    parser.add_argument("--init", type=Path, help="write a randomly initialised model here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args()
    if not (args.data or args.init):
        parser.error("nothing to do: pass --data and/or --init")
    if args.data:
        write_data(args.data)
    if args.init:
        write_initial_model(args.init, args.seed)


if __name__ == "__main__":
    main()
