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
from .model import DecoderStates, Model
from .sampler_params import SamplerParams

# -- One denoising step -------------------------------------------------------


class CanvasState(NamedTuple):
    """What one denoising step hands the next, all on the device."""

    canvas: mx.array  # [B, C] the decoder's input
    argmax: mx.array  # [B, C] what would be committed if the canvas stopped now
    signal: Optional[mx.array]  # self-conditioning input; None on a canvas' first step
    history: mx.array  # [S, B, C] the last S argmax canvases, for the stop check
    stopped: mx.array  # [B] bool: rows whose canvas has stopped
    # With ``commit_after`` (None without): [B, C] int32, steps each
    # position's argmax has not changed, and [B, C] bool, positions committed.
    streak: Optional[mx.array] = None
    committed: Optional[mx.array] = None
    # With ``reuse_committed``: the last pass's per-layer states, and how many
    # approximate passes since the last exact one.
    decoder: Optional[DecoderStates] = None
    stale: int = 0
    positions: int = 0  # canvas positions per row the pass that made this state computed

    @classmethod
    def start(cls, canvas: mx.array, params: SamplerParams) -> "CanvasState":
        B, C = canvas.shape
        history = sampler.empty_argmax_history(params.stability_threshold, B, C)
        stopped = mx.zeros((B,), dtype=mx.bool_)
        if not params.commit_after:
            return cls(canvas, canvas, None, history, stopped)
        # -1: the noise canvas is no argmax, so the first step starts every streak at 0.
        streak = mx.full((B, C), -1, dtype=mx.int32)
        return cls(canvas, canvas, None, history, stopped, streak, mx.zeros((B, C), dtype=mx.bool_))

    def fixed(self, given: Optional[sampler.FixedPositions]) -> Optional[sampler.FixedPositions]:
        """The positions a step holds: ``given`` and the committed ones (at their argmax)."""
        if self.committed is None:
            return given
        if given is None:
            return sampler.FixedPositions(self.committed, self.argmax)
        return sampler.FixedPositions(given.mask | self.committed, mx.where(given.mask, given.tokens, self.argmax))


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
    C = state.canvas.shape[1]
    if not (params.reuse_committed and params.commit_after):
        logits = model.denoise(state.canvas, cache, **conditioning)
        next_state, update = sample_step(model, logits, state, params, step, keys, fixed, hold)
        return next_state._replace(positions=C), update
    rows = None
    if state.decoder is not None and state.stale < params.reuse_committed:
        rows = uncommitted_rows(state.committed)
    logits, decoder = model.denoise_rows(state.canvas, cache, rows, state.decoder, **conditioning)
    next_state, update = sample_step(model, logits, state, params, step, keys, fixed, hold)
    stale, positions = (0, C) if rows is None else (state.stale + 1, rows.shape[1])
    return next_state._replace(decoder=decoder, stale=stale, positions=positions), update


def uncommitted_rows(committed: mx.array) -> Optional[mx.array]:
    """The positions [B, A] an approximate step computes: each row's
    uncommitted ones, in order (rows with fewer are padded with committed
    positions, recomputed); None when that is every position. At least one,
    so a step always runs. Reads the count back: one wait for the device."""
    B, C = committed.shape
    count = max(int((~committed).sum(axis=-1).max().item()), 1)
    if count == C:
        return None
    # Stable: uncommitted positions first, each group in position order.
    return mx.argsort(committed.astype(mx.int32), axis=-1)[:, :count].astype(mx.int32)


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
    held = state.fixed(fixed)
    update = _denoise_rows(logits, temperature, params.entropy_bound, keys, held, params.accept_threshold)
    if held is not fixed and update.fixed_logprob is not None:
        # How well the model agrees with the *given* text: committed positions are its own.
        given = None if fixed is None else mx.where(fixed.mask, update.fixed_logprob, 0.0)
        update = update._replace(fixed_logprob=given)
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
    streak, committed = state.streak, state.committed
    if committed is not None:
        streak, committed = sampler.commit_stable(
            argmax,
            state.argmax,
            streak,
            update.accepted,
            update.entropy,
            committed,
            params.commit_after,
            params.confidence_threshold,
        )
        if hold:
            streak = sampler.hold_finished_rows(state.stopped, state.streak, streak)
            committed = sampler.hold_finished_rows(state.stopped, state.committed, committed)
    return state._replace(
        canvas=canvas,
        argmax=argmax,
        signal=signal,
        history=history,
        stopped=state.stopped | stop,
        streak=streak,
        committed=committed,
    ), update


def _denoise_rows(
    logits: mx.array, temperature: float, entropy_bound: float, keys: List[mx.array], fixed=None, threshold=0.0
):
    """The sampler update, each row on its own key (so a row gives in a batch what it gives alone)."""
    if len(keys) == 1:
        return sampler.denoise_step_update(logits, entropy_bound, keys[0], fixed, temperature, threshold)
    rows = [
        sampler.denoise_step_update(
            logits[r : r + 1], entropy_bound, k, None if fixed is None else fixed.row(r), temperature, threshold
        )
        for r, k in enumerate(keys)
    ]
    return sampler.DenoiseStep(*(None if parts[0] is None else mx.concatenate(parts) for parts in zip(*rows)))
