"""Work per committed token: the FLOPs a generation spends, counted from its
steps, and the accuracy it buys on a checkpoint's evaluation set.

A canvas costs one denoising step per step it runs (the first without
self-conditioning) and, unless it is the last, one encoding of its committed
tokens into the cache. No sampler rule removes that encoding: it is the floor
of one forward pass per canvas.
"""

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..chat_template import render
from ..config import ModelArgs
from ..generate import stream_generate
from ..sampler_params import FAST, SamplerParams, sampler_params
from ..stats import Progress
from ..thinking import END_OF_TURN
from .breakdown import layer_shapes, matmul_flops, matmul_shapes


def step_flops(
    args: ModelArgs, batch: int, cache_len: int, self_conditioning: bool, top_k: int = 0, rows: Optional[int] = None
) -> int:
    shapes = matmul_shapes(args, batch, cache_len, self_conditioning, top_k, rows)
    return sum(matmul_flops(s) for s in shapes.values())


def encode_flops(args: ModelArgs, batch: int, tokens: int, cache_len: int) -> int:
    return sum(matmul_flops(s) for s in layer_shapes(args, batch, tokens, cache_len).values())


def generation_flops(
    args: ModelArgs,
    batch: int,
    prompt_tokens: int,
    steps_per_canvas: Sequence[int],
    top_k: int = 0,
    positions: Optional[Sequence[Sequence[int]]] = None,
) -> Dict[str, int]:
    """FLOPs of the denoising steps and of the canvas encodings of one
    generation after a prompt of ``prompt_tokens`` (prompt encoding apart).
    ``positions``, per canvas, the positions each step computed
    (``Progress.canvas_positions``; the whole canvas where not given or 0)."""
    C = args.canvas_length
    denoise = encode = 0
    for index, steps in enumerate(steps_per_canvas):
        cache_len = prompt_tokens + index * C
        computed = list(positions[index]) if positions else []
        computed += [0] * (steps - len(computed))
        for step, rows in enumerate(computed[:steps]):
            rows = None if rows in (0, C) else rows
            denoise += step_flops(args, batch, cache_len, step > 0, top_k, rows)
        if index < len(steps_per_canvas) - 1:
            encode += encode_flops(args, batch, C, cache_len)
    return dict(denoise=denoise, encode=encode)


# The sampler settings the accuracy table compares, by name: each departs
# from the reference in one way (``fast`` is sampler_params.FAST).
VARIANTS = {
    "reference": {},
    "top-k-8": dict(self_conditioning_top_k=8),
    "1-step": dict(max_denoising_steps=1),
    "2-steps": dict(max_denoising_steps=2),
    "confident-once": dict(stability_threshold=0),
    "confident-once-0.05": dict(stability_threshold=0, confidence_threshold=0.05),
    "threshold-0.9": dict(accept_threshold=0.9),
    "threshold-0.7": dict(accept_threshold=0.7),
    "commit-1": dict(commit_after=1),
    "commit-1+reuse-4": dict(commit_after=1, reuse_committed=4),
    "commit-1+reuse-48": dict(commit_after=1, reuse_committed=48),
    "threshold-0.9+commit-1+reuse-4": dict(accept_threshold=0.9, commit_after=1, reuse_committed=4),
    "fast": dict(fast=True),
}

VARIANT_HELP = {
    "reference": "the checkpoint's sampler, as transformers runs it",
    "top-k-8": "self-conditioning on the 8 most likely tokens of the last step",
    "1-step": "one denoising step per canvas: its argmax is committed",
    "2-steps": "at most 2 steps per canvas",
    "confident-once": "stop at the first confident step (stability threshold 0)",
    "confident-once-0.05": "the same, confident below 0.05 nats of mean entropy",
    "threshold-0.9": "also accept positions whose top token has probability >= 0.9",
    "threshold-0.7": "the same at 0.7",
    "commit-1": "commit a position accepted, unchanged for 1 step and under the confidence threshold",
    "commit-1+reuse-4": "commit-1, the decoder over uncommitted positions only, a full pass every 5th step",
    "commit-1+reuse-48": "the same, never a full pass after the first",
    "threshold-0.9+commit-1+reuse-4": "threshold-0.9 and commit-1+reuse-4",
    "fast": f"the fast setting: {', '.join(f'{k}={v}' for k, v in FAST.items())}",
}


def answer_check(metric: str) -> Callable[[str, str, str], bool]:
    """How an answer is scored: equal to the reference's answer ("exact"), or
    by a task's own check, "FILE.py:FUNCTION", called as FUNCTION(question,
    written, answer) -> a bool or a share from 0 to 1 (partial credit;
    examples/fill, whose puzzles have many right answers, scores rows).
    ValueError naming --metric if it cannot be loaded."""
    if metric == "exact":
        return lambda question, written, answer: written == answer
    path, _, name = metric.rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"--metric {metric}: not 'exact' nor FILE.py:FUNCTION")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--metric {metric}: no such file {file}")
    spec = importlib.util.spec_from_file_location(f"_metric_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"--metric {metric}: {file} failed to load ({type(e).__name__}: {e})") from None
    check = getattr(module, name, None)
    if not callable(check):
        raise ValueError(f"--metric {metric}: {file} has no function {name!r}")
    return check


def read_problems(path: Path, limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """(question, answer) pairs from a jsonl file in the chat "messages" format
    (a user turn, then the assistant's answer), as mlx_diffgemma.lora reads."""
    problems = []
    for number, line in enumerate(path.read_text().splitlines()[:limit], 1):
        try:
            messages = json.loads(line)["messages"]
            question, answer = messages[0]["content"], messages[1]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path}:{number}: not a chat example (messages: a user turn, then the answer)") from None
        problems.append((question, answer))
    if not problems:
        raise ValueError(f"{path}: no examples")
    return problems


def evaluation_file(data: str) -> Path:
    """``data`` names a jsonl file, or a directory holding test.jsonl."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise ValueError(f"--data {data}: no such file (a jsonl file, or a directory with test.jsonl)")
    return path


@dataclass
class Score:
    """What one sampler setting gave on an evaluation set."""

    problems: int = 0
    exact: float = 0.0  # problems right (a check may give part of one)
    canvases: int = 0
    steps: int = 0
    committed_tokens: int = 0  # tokens returned plus the EOS that ended each answer
    denoise_flops: int = 0
    encode_flops: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        tokens = max(self.committed_tokens, 1)
        return dict(
            problems=self.problems,
            exact=self.exact,
            accuracy=self.exact / self.problems,
            canvases=self.canvases,
            steps_per_canvas=self.steps / self.canvases,
            tokens_per_forward=self.committed_tokens / self.steps,
            denoise_flops_per_token=self.denoise_flops / tokens,
            flops_per_token=(self.denoise_flops + self.encode_flops) / tokens,
            seconds=self.seconds,
            tokens_per_s=self.committed_tokens / max(self.seconds, 1e-9),
        )


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Tuple[str, str]],
    seed: int = 0,
    max_tokens: int = 256,
    params: Optional[SamplerParams] = None,
    metric: str = "exact",
    **settings,
) -> dict:
    """Accuracy and work per committed token over ``problems``: each question
    through the chat template and ``stream_generate`` (seed ``seed`` + its
    index); the text before the end of the turn, stripped, is right by
    ``answer_check(metric)``. ``params`` or ``settings``: the sampler's,
    as for ``stream_generate``."""
    params = sampler_params(model, params, settings)
    right = answer_check(metric)
    score = Score(problems=len(problems))
    tic = time.perf_counter()
    for i, (question, answer) in enumerate(problems):
        prompt = render(tokenizer, [{"role": "user", "content": question}])
        progress, text, last = Progress(), "", None
        for last in stream_generate(model, tokenizer, prompt, max_tokens, seed=seed + i, params=params):
            progress.update(last)
            text += last.text
        value = float(right(question, text.removesuffix(END_OF_TURN).strip(), answer))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--metric {metric}: scored problem {i + 1} {value:g}; a check returns 0 to 1")
        score.exact += value
        steps = [progress.steps[c] for c in sorted(progress.steps)]
        score.canvases += len(steps)
        score.steps += sum(steps)
        score.committed_tokens += last.generation_tokens + (last.stop_token is not None)
        flops = generation_flops(
            model.args, 1, last.prompt_tokens, steps, params.self_conditioning_top_k, progress.canvas_positions()
        )
        score.denoise_flops += flops["denoise"]
        score.encode_flops += flops["encode"]
    score.seconds = time.perf_counter() - tic
    return score.summary()
