"""Exact-match accuracy of a model on the shift task, and how fast its canvases converge.

    python examples/shift/evaluate.py --model examples/shift/model --data examples/shift/data

generates an answer to every problem of ``test.jsonl`` (one at a time, seed
``--seed`` + problem index) with the sampler settings of the model's
generation_config.json (the released checkpoint's) unless flags override
them, and prints the share of answers that are exactly right, the mean
denoising steps per canvas and the tokens per forward.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.generate import Progress
from mlx_diffgemma.thinking import END_OF_TURN


@dataclass
class Score:
    problems: int
    exact: int
    canvases: int
    steps: int
    committed_tokens: int
    forwards: int

    @property
    def accuracy(self) -> float:
        return self.exact / self.problems

    @property
    def steps_per_canvas(self) -> float:
        return self.steps / self.canvases

    @property
    def tokens_per_forward(self) -> float:
        return self.committed_tokens / self.forwards


def read_problems(path: Path, limit: Optional[int] = None) -> List[tuple]:
    """(question, answer) pairs of a jsonl file in the messages format."""
    problems = []
    for line in path.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        problems.append((messages[0]["content"], messages[1]["content"]))
    return problems


def score(model, tokenizer, problems, seed: int = 0, max_tokens: int = 256, **sampler) -> Score:
    total = Score(len(problems), 0, 0, 0, 0, 0)
    for i, (question, answer) in enumerate(problems):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        progress, text, last = Progress(), "", None
        for last in stream_generate(model, tokenizer, prompt, max_tokens, seed=seed + i, **sampler):
            progress.update(last)
            text += last.text
        total.exact += text.removesuffix(END_OF_TURN).strip() == answer
        total.canvases += len(progress.steps)
        total.steps += sum(progress.steps.values())
        total.forwards += last.denoising_steps
        total.committed_tokens += round(last.tokens_per_forward * last.denoising_steps)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).parent / "model"))
    parser.add_argument("--adapter-path")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-denoising-steps", type=int)
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    path = args.data / f"{args.split}.jsonl"
    if not path.exists():
        sys.exit(f"error: {path}: missing (build it: python examples/shift/build.py --data {args.data})")
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    sampler = {"max_denoising_steps": args.max_denoising_steps} if args.max_denoising_steps else {}
    s = score(model, tokenizer, read_problems(path, args.limit), seed=args.seed, **sampler)
    numbers = {
        "problems": s.problems,
        "accuracy": s.accuracy,
        "steps_per_canvas": s.steps_per_canvas,
        "tokens_per_forward": s.tokens_per_forward,
        "canvases": s.canvases,
    }
    if args.json:
        print(json.dumps(numbers))
    else:
        print(f"Exact match: {s.exact}/{s.problems} ({100 * s.accuracy:.1f}%)")
        print(f"Denoising steps per canvas: {s.steps_per_canvas:.2f} over {s.canvases} canvases")
        print(f"Tokens per forward: {s.tokens_per_forward:.2f}")


if __name__ == "__main__":
    main()
