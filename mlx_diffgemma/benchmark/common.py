"""What the benchmark's measurements share: timing helpers and model preparation."""

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cpu_experts import upcast_experts

# Adaptive stopping off: no canvas' mean entropy is ever below this.
NEVER_CONFIDENT = 1e-30


def set_dtype(model: nn.Module, dtype: mx.Dtype):
    """Cast the weights; on the CPU the unquantized experts stay float32, as ``load`` keeps them."""
    model.set_dtype(dtype)
    upcast_experts(model)
    mx.eval(model.parameters())


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def global_attention_fields(text: dict) -> dict:
    """global_head_dim / num_global_key_value_heads, also when written as per_layer_config.

    transformers >= 5.2x writes the full layers' head dim and KV heads as
    per_layer_config; mlx-vlm 0.7 and mlx-lm read only the older fields.
    """
    text = dict(text)
    for override in (text.get("per_layer_config") or {}).values():
        text.setdefault("global_head_dim", override.get("head_dim"))
        text.setdefault("num_global_key_value_heads", override.get("num_key_value_heads"))
    return text


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of ``mx.eval(fn())`` for each function (building the
    graph is timed too), taking turns: one run of each per round.

    Other processes' load then weighs on all of them alike, so their times
    stay comparable (and the parts of a step keep summing to about the step).
    """
    for fn in fns.values():
        for _ in range(warmup):
            mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def step_intervals(marks: Sequence[Tuple[int, float]]) -> List[float]:
    """Durations of the steps after a canvas' first, from (canvas, end time) marks.

    A canvas' first step also pays for encoding the previous canvas (or the
    prompt) and has no self-conditioning, so it is left out.
    """
    return [t - t_prev for (c_prev, t_prev), (c, t) in zip(marks, marks[1:]) if c == c_prev]


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None
