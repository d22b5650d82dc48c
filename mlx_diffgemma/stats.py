"""A generation's statistics from its stream of responses: steps per canvas
(``Progress``, also the live view's status line) and mlx_lm.generate's
verbose summary (``print_stats``)."""

import sys
from typing import Dict, List, Optional


class Progress:
    """Denoising steps per canvas, counted from a stream of responses."""

    def __init__(self):
        self.steps: Dict[int, int] = {}
        # Per canvas, per step: the canvas positions its decoder pass computed.
        self.positions: Dict[int, Dict[int, int]] = {}

    def update(self, response):
        self.steps[response.canvas_index] = response.step
        if getattr(response, "positions", 0):
            self.positions.setdefault(response.canvas_index, {})[response.step] = response.positions

    def canvas_positions(self) -> List[List[int]]:
        """Per canvas in order, the positions each of its steps computed."""
        return [[self.positions.get(c, {}).get(s, 0) for s in range(1, self.steps[c] + 1)] for c in sorted(self.steps)]

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
