"""A generation's statistics from its stream of responses: steps per canvas
(``Progress``, also the live view's status line) and mlx_lm.generate's
verbose summary (``print_stats``)."""

import sys
from typing import Dict, Optional


class Progress:
    """Denoising steps per canvas, counted from a stream of responses."""

    def __init__(self):
        self.steps: Dict[int, int] = {}

    def update(self, response):
        self.steps[response.canvas_index] = response.step

    def status(self, response) -> str:
        return (
            f"canvas {response.canvas_index + 1}, "
            f"step {self.steps.get(response.canvas_index, 0)}/{response.max_denoising_steps}"
        )


def print_stats(last, progress: Progress, conversation_tokens: Optional[int] = None, file=None):
    """mlx_lm.generate's verbose summary, with the canvases and their steps."""
    file = file or sys.stdout
    steps = [progress.steps[c] for c in sorted(progress.steps)]
    prompt = f"{last.prompt_tokens} tokens"
    if conversation_tokens is not None:
        prompt += f" ({conversation_tokens} in the conversation)"
    print("=" * 10, file=file)
    print(f"Prompt: {prompt}, {last.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec", file=file)
    print(
        f"Canvases: {len(steps)}, denoising steps per canvas: {', '.join(map(str, steps))} ({sum(steps)} in all)",
        file=file,
    )
    print(f"Tokens per forward: {last.tokens_per_forward:.2f}", file=file)
    print(f"Peak memory: {last.peak_memory:.3f} GB", file=file, flush=True)
