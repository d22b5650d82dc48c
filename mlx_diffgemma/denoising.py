"""One denoising step: the decoder's logits for a canvas, then the sampler.

``denoise_step`` is the one place outside the model that calls
``model.denoise``; generation's canvas loop (``generate.generate_step``),
infilling and the benchmark all run it. ``sample_step`` is its sampler half,
from the logits on; ``CanvasState`` is what one step hands the next. Steps
count up, 1 to ``max_denoising_steps`` within a canvas. The per-step math
lives in ``sampler``.
"""

from typing import List, NamedTuple, Optional

import mlx.core as mx

from . import sampler
from .cache import PromptCache
from .model import Model
from .sampler_params import SamplerParams

# -- One denoising step -------------------------------------------------------


class CanvasState(NamedTuple):
    """What one denoising step hands the next, all on the device."""

    canvas: mx.array  # [B, C] the decoder's input
    argmax: mx.array  # [B, C] what would be committed if the canvas stopped now
    signal: Optional[mx.array]  # self-conditioning input; None on a canvas' first step
    history: mx.array  # [S, B, C] the last S argmax canvases, for the stop check
    stopped: mx.array  # [B] bool: rows whose canvas has stopped

    @classmethod
    def start(cls, canvas: mx.array, params: SamplerParams) -> "CanvasState":
        B, C = canvas.shape
        history = sampler.empty_argmax_history(params.stability_threshold, B, C)
        return cls(canvas, canvas, None, history, mx.zeros((B,), dtype=mx.bool_))


def uses_probs(model: Model) -> bool:
    """Whether the decoder takes the sampler's softmax as its signal.

    The next step conditions on the processed logits, cast to the model's
    dtype as the reference does; for float32 models that is the softmax the
    sampler already took, which saves a pass over the vocabulary.
    """
    return model.dtype == mx.float32


def denoise_step(
    model: Model,
    cache: PromptCache,
    state: CanvasState,
    params: SamplerParams,
    step: int,
    keys: List[mx.array],
    fixed: Optional[sampler.FixedPositions] = None,
    hold: bool = False,
):
    """One denoising step: the decoder's logits for ``state.canvas``, then the sampler.

    Returns the next ``CanvasState`` and the step's ``sampler.DenoiseStep``
    (entropies, acceptance), all lazy. ``step`` is the canvas' step, from 1
    (it sets the temperature); ``keys`` holds one PRNG key per row. ``hold``
    keeps the canvas of rows that already stopped (``state.stopped``), as the
    reference does while other rows go on.
    """
    signal = state.signal
    if signal is None:
        conditioning = {}
    elif params.self_conditioning_top_k:
        conditioning = {"soft_embedding": signal}
    elif uses_probs(model):
        conditioning = {"self_conditioning_probs": signal}
    else:
        conditioning = {"self_conditioning": signal}
    logits = model.denoise(state.canvas, cache, **conditioning)
    return sample_step(model, logits, state, params, step, keys, fixed, hold)


def sample_step(
    model: Model,
    logits: mx.array,
    state: CanvasState,
    params: SamplerParams,
    step: int,
    keys: List[mx.array],
    fixed: Optional[sampler.FixedPositions] = None,
    hold: bool = False,
):
    """The sampler's half of ``denoise_step``, from the decoder's logits on."""
    temperature = params.temperature(step)
    update = _denoise_rows(logits, temperature, params.entropy_bound, keys, fixed)
    argmax, canvas = update.argmax_canvas, update.next_canvas
    if params.self_conditioning_top_k:
        # The next step's soft embedding [B, C, D], from k rows per position.
        signal = model.sparse_soft_embedding(*sampler.top_k(update.weights, params.self_conditioning_top_k))
    elif uses_probs(model):
        signal = update.probs
    else:
        signal = (logits / temperature).astype(model.dtype)
    if hold:
        argmax = sampler.hold_finished_rows(state.stopped, state.argmax, argmax)
        canvas = sampler.hold_finished_rows(state.stopped, state.canvas, canvas)
        signal = sampler.hold_finished_rows(state.stopped, state.signal, signal)
    stop, history = sampler.stable_and_confident(argmax, state.history, update.entropy, params.confidence_threshold)
    return CanvasState(canvas, argmax, signal, history, state.stopped | stop), update


def _denoise_rows(logits: mx.array, temperature: float, entropy_bound: float, keys: List[mx.array], fixed=None):
    """The sampler update, each row on its own key (so a row gives in a batch what it gives alone)."""
    if len(keys) == 1:
        return sampler.denoise_step_update(logits, entropy_bound, keys[0], fixed, temperature)
    rows = [
        sampler.denoise_step_update(
            logits[r : r + 1], entropy_bound, k, None if fixed is None else fixed.row(r), temperature
        )
        for r, k in enumerate(keys)
    ]
    return sampler.DenoiseStep(*(None if parts[0] is None else mx.concatenate(parts) for parts in zip(*rows)))
