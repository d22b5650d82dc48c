"""Build the "roster" task: its data, and a randomly initialised model to train on it.

The task: the user sends ``MIN_WORDS`` to ``MAX_WORDS`` four-letter words
(a capital no other word starts with, then random letters), in alphabetical order; the answer is every one of
them exactly once, in any order, separated by spaces. The training answers
are uniformly random orders, so the prompt fixes what a canvas must hold
but not where: which word goes first is a free choice, and each choice
constrains every other position (a word used once cannot be used again).
That is the released model's kind of canvas (tokens that depend on each
other, some free and most determined once their neighbours are), so the
entropy-bounded sampler settles it over many steps; examples/shift, whose
answer follows from the prompt position by position, settles in 2.

Answers are checkable without a reference order: an answer is right when it
holds each prompt word exactly once; a slot (one word of the answer) is right
when it holds a prompt word no other slot repeats. Infill problems cut 1 to
``MAX_GAP_WORDS`` words out of a right answer: the suffix then says which
words are left, which the prefix alone cannot.

    python examples/roster/build.py --data examples/roster/data --init examples/roster/init

writes train/valid/test.jsonl (chat messages), infill.jsonl (the question,
the prefix, the middle and the suffix of an answer) and a model directory
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
SHIFT_CONFIG = shift.TEXT_CONFIG

CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LENGTH = 4
MIN_WORDS, MAX_WORDS = 6, 12  # an answer of 12 words and its <turn|> is 60 tokens: one canvas
MAX_GAP_WORDS = 3
CANVAS_LENGTH = 64
SPLITS = {"train": (24_000, 0), "valid": (64, 1), "test": (200, 2)}  # problems, seed
INFILL = (200, 3)

# The shift model's config (rope, norms, ids, widths), deeper, with a sliding
# window shorter than an example (about 130 tokens) so both kinds of layer matter.
TEXT_CONFIG = dict(
    SHIFT_CONFIG,
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    sliding_window=64,
)


def words(rng: np.random.Generator, n: int) -> list:
    """``n`` random words of WORD_LENGTH letters, each with its own capital
    first: the capital says which word a slot holds, so the rest of the
    word is a copy keyed by one letter."""
    capitals = rng.choice(list(CAPITALS), size=n, replace=False)
    return sorted(c + "".join(rng.choice(list(LETTERS), size=WORD_LENGTH - 1)) for c in capitals)


def problem(rng: np.random.Generator) -> tuple:
    """(question, one right answer): the words sorted, and in a random order."""
    chosen = words(rng, int(rng.integers(MIN_WORDS, MAX_WORDS + 1)))
    return " ".join(chosen), " ".join(rng.permutation(chosen).tolist())


def score(question: str, answer: str) -> dict:
    """Whether ``answer`` holds each word of ``question`` exactly once, and how
    many of its slots hold a word of the question that no other slot repeats
    (out of the question's word count: missing words count as wrong slots)."""
    wanted = question.split(" ")
    written = answer.split(" ")
    right = sum(1 for w in written if w in wanted and written.count(w) == 1)
    return {"right": sorted(written) == wanted, "slots": right, "words": len(wanted)}


def infill_problem(rng: np.random.Generator) -> dict:
    """A right answer with 1 to MAX_GAP_WORDS whole words cut out of it (with
    the space after each), the cut anywhere but the very end."""
    question, answer = problem(rng)
    order = answer.split(" ")
    gap = int(rng.integers(1, MAX_GAP_WORDS + 1))
    start = int(rng.integers(0, len(order) - gap))
    prefix = "".join(w + " " for w in order[:start])
    middle = "".join(w + " " for w in order[start : start + gap])
    return {"question": question, "prefix": prefix, "middle": middle, "suffix": " ".join(order[start + gap :])}


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
