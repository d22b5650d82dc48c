"""Block-diffusion generation, layered as mlx-lm's generate.py is.

- ``denoise_step`` runs one denoising step on a canvas. It is the one place
  outside the model that calls ``model.denoise``; the benchmark times it too.
- ``generate_step`` runs the canvases for context already in the cache: for
  each canvas it starts from uniform noise, denoises it for up to
  ``max_denoising_steps`` steps (stopping early once it is stable and
  confident), commits its argmax tokens and encodes them into the cache so the
  next canvas sees them. It yields a ``DenoisingStep`` per step and a
  ``CanvasCommit`` per canvas: token ids and device arrays, no text, no timing.
- ``stream_generate`` encodes the prompt and turns those events into
  ``GenerationResponse``s: detokenized text, drafts and statistics.
- ``generate`` collects a stream (and prints it with ``verbose``); ``chat``,
  the command lines and the benchmark build on the same pieces.

The per-step math lives in ``sampler``; docs/generation.md describes the
layers and what a step waits for.
"""

import math
import numbers
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import mlx.core as mx

from . import sampler
from .cache import PromptCache
from .config import eos_token_ids, pad_token_id
from .model import Model

PREFILL_STEP = 2048

Prompt = Union[str, Sequence[int]]


# -- The sampler's settings ---------------------------------------------------


def _setting(default, kind, minimum, help: str, metavar: str, inclusive: bool = True):
    """A sampler setting: its default, type, lower bound and help text.

    The command lines build their flags from these, so a setting is defined,
    checked and documented in one place.
    """
    return field(
        default=default,
        metadata=dict(kind=kind, minimum=minimum, inclusive=inclusive, help=help, metavar=metavar),
    )


@dataclass
class SamplerParams:
    """The diffusion sampler's settings, named as in transformers.

    The defaults are the reference's, used where the checkpoint's
    generation_config.json leaves a value unset (transformers writes nulls).
    """

    max_denoising_steps: int = _setting(
        48, int, 1, "Most denoising steps per canvas; a canvas stops earlier once stable and confident.", "N"
    )
    entropy_bound: float = _setting(
        0.1, float, 0.0, "Entropy budget (nats) for the tokens accepted at each step.", "NATS", inclusive=False
    )
    t_min: float = _setting(0.4, float, 0.0, "Temperature at the last step of a canvas.", "T")
    t_max: float = _setting(
        0.8, float, 0.0, "Temperature at the first step of a canvas (above --t-min).", "T", inclusive=False
    )
    stability_threshold: int = _setting(
        1, int, 0, "Steps the argmax canvas must stay unchanged before it can stop.", "N"
    )
    confidence_threshold: float = _setting(
        0.005, float, 0.0, "Mean entropy (nats) below which a stable canvas stops.", "NATS", inclusive=False
    )
    # Opt-in departures from the reference: their defaults leave it exact.
    self_conditioning_top_k: int = _setting(
        0,
        int,
        0,
        "Self-condition each step on the K most likely tokens of the last one instead of the whole "
        "vocabulary; departs from the reference (0: the whole vocabulary, as the reference).",
        "K",
    )
    eos_token_id: List[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0

    @classmethod
    def resolve(cls, model: Model, fast: bool = False, **overrides) -> "SamplerParams":
        """Defaults from the checkpoint's generation config, then ``FAST`` if
        ``fast``, then ``overrides``."""
        if fast:
            overrides = {**FAST, **{k: v for k, v in overrides.items() if v is not None}}
        gen = dict(getattr(model, "generation_config", None) or {})
        sampler_config = gen.get("sampler_config") or {}
        values = asdict(cls())
        for name in values:
            source = sampler_config if name == "entropy_bound" else gen
            if source.get(name) is not None:
                values[name] = source[name]
        values["eos_token_id"] = eos_token_ids(gen, model.args)
        values["pad_token_id"] = pad_token_id(gen, model.args)
        for name in SAMPLER_SETTINGS:
            if name not in overrides or overrides[name] is None:
                try:
                    values[name] = check_setting(name, values[name])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the checkpoint's generation_config.json: {e}") from None
        for name, value in overrides.items():
            if name not in values:
                raise TypeError(f"unknown generation parameter {name!r}")
            if value is not None:
                values[name] = check_setting(name, value) if name in SAMPLER_SETTINGS else value
        params = cls(**values)
        params.validate()
        if params.self_conditioning_top_k > model.args.vocab_size:
            raise ValueError(
                f"self_conditioning_top_k must be at most the vocabulary size {model.args.vocab_size} "
                f"(got {params.self_conditioning_top_k})"
            )
        return params

    def validate(self):
        """What no single setting can check alone."""
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")

    def temperature(self, step: int) -> float:
        return sampler.temperature(step, self.max_denoising_steps, self.t_min, self.t_max)


# The ``fast`` setting: what docs/benchmarks.md measured to cut the work per
# committed token most for the least accuracy on the trained model: a canvas
# stops at its first confident step (1.2 steps a canvas there, not 2.0, for
# 1 point of 200 problems), and self-conditioning reads 8 gathered rows per
# position instead of a product over the vocabulary (no accuracy lost; 13x
# cheaper at mini's widths). It departs from the reference sampler; the
# defaults stay the reference's.
FAST = dict(stability_threshold=0, self_conditioning_top_k=8)

SAMPLER_SETTINGS = tuple(f.name for f in fields(SamplerParams) if "help" in f.metadata)
SETTING_INFO = {f.name: dict(f.metadata, default=f.default) for f in fields(SamplerParams) if "help" in f.metadata}


def setting_problem(name: str, value) -> Optional[str]:
    """What is wrong with ``value`` for setting ``name`` (None: nothing), in a
    phrase that reads after the setting's name: "must be > 0 (got 0)"."""
    info = SETTING_INFO[name]
    minimum, inclusive = info["minimum"], info["inclusive"]
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if not math.isfinite(value):
        return f"must be a finite number (got {shown})"
    if value < minimum or (value == minimum and not inclusive):
        return f"must be {'>=' if inclusive else '>'} {minimum:g} (got {shown})"
    return None


def check_setting(name: str, value):
    """``value`` as setting ``name`` takes it; TypeError or ValueError naming the setting."""
    kind = SETTING_INFO[name]["kind"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer (got {value!r})")
        value = int(value)
    else:
        value = float(value)
    problem = setting_problem(name, value)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


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
    (entropies, acceptance), all lazy. ``step`` counts down from
    ``max_denoising_steps``; ``keys`` holds one PRNG key per row. ``hold``
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


# -- The canvas loop ----------------------------------------------------------


@dataclass
class DenoisingStep:
    """``generate_step``'s event after each denoising step.

    The arrays are the step's own (already evaluated); reading one back to the
    host is up to the caller. Rows in ``stopped`` keep their canvas until the
    canvas is committed.
    """

    canvas_index: int
    step: int  # counts down from max_denoising_steps to 1 within a canvas
    argmax: mx.array  # [B, C] int32: what would be committed if the canvas stopped now
    entropy: mx.array  # [B, C] float32, nats (0 at fixed positions)
    accepted: mx.array  # [B, C] bool: positions whose sample survives into the next step
    mean_entropy: List[float]  # per row: the stop check's confidence measure
    stopped: List[bool]  # rows whose canvas has stopped, at this step or before
    denoised: List[bool]  # rows this step counted as a forward pass for
    # [B, C] float32: log-probability the step gives each fixed position's
    # token (0 elsewhere); None on canvases without fixed positions.
    fixed_logprob: Optional[mx.array] = None


@dataclass
class CanvasCommit:
    """``generate_step``'s event when a canvas is committed.

    Per row: ``tokens`` is what the canvas adds to the row's output (cut at
    the first EOS and at ``max_tokens``), ``stop_token`` the EOS that ended
    the row, ``finish_reason`` "stop", "length" or None while more canvases
    follow. Rows that finished on an earlier canvas have ``active`` False and
    nothing else set.
    """

    canvas_index: int
    step: int  # the step the canvas stopped at
    active: List[bool]
    tokens: List[List[int]]
    stop_tokens: List[Optional[int]]
    finish_reasons: List[Optional[str]]
    valid_tokens: List[int]  # tokens before the first EOS, plus the EOS: the reference's count


class NonFiniteError(ValueError):
    """The decoder's logits hold NaN or infinity: the checkpoint is broken."""


class RowKeys:
    """One PRNG key chain per batch row, all on device."""

    def __init__(self, seeds: List[int]):
        self.keys = [mx.random.key(s) for s in seeds]

    def next(self) -> List[mx.array]:
        pairs = [mx.random.split(k) for k in self.keys]
        self.keys = [p[0] for p in pairs]
        return [p[1] for p in pairs]


def noise_canvas(keys: List[mx.array], canvas_length: int, vocab_size: int) -> mx.array:
    """A fresh canvas of uniform noise, each row from its own key."""
    return mx.concatenate([sampler.initial_canvas(k, 1, canvas_length, vocab_size) for k in keys])


def _queue(result):
    """Start computing a step on the device; returns (state, update, mean entropy)."""
    state, update = result
    mean_entropy = update.entropy.mean(axis=-1)
    mx.async_eval(
        state.canvas,
        state.argmax,
        state.signal,
        state.history,
        state.stopped,
        update.entropy,
        update.accepted,
        update.fixed_logprob,
        mean_entropy,
    )
    return state, update, mean_entropy


def generate_step(
    model: Model,
    cache: PromptCache,
    seeds: List[int],
    max_tokens: int,
    params: SamplerParams,
    initial_canvas: Optional[mx.array] = None,
    fixed: Optional[sampler.FixedPositions] = None,
) -> Iterator[Union[DenoisingStep, CanvasCommit]]:
    """Denoise and commit canvases after the context already in ``cache``.

    One row per seed (the cache's batch). ``initial_canvas`` [B, C] replaces
    the first canvas' noise; ``fixed`` holds positions of the first canvas at
    given tokens: never resampled or renoised, always accepted, part of the
    argmax canvas, entropy 0. Every canvas but the last is encoded into the
    cache once committed.

    On the host each step reads back only the rows' stop flags and mean
    entropies. While the canvas cannot stop or is far from confident, the next
    step's graph is built and queued before that read, so the device never
    waits for the host; a queued step the read makes moot (the canvas stopped,
    or a row stopped and must now be held) is dropped and its keys reused, so
    results never depend on it.
    """
    B, C, V = len(seeds), model.canvas_length, model.args.vocab_size
    N = params.max_denoising_steps
    rng = RowKeys(seeds)
    finished = [False] * B
    committed = [0] * B
    n_canvases = math.ceil(max_tokens / C)

    for canvas_index in range(n_canvases):
        canvas_keys = rng.next()
        if canvas_index == 0 and initial_canvas is not None:
            canvas = initial_canvas
        else:
            canvas = noise_canvas(canvas_keys, C, V)
        held_fixed = fixed if canvas_index == 0 else None
        if held_fixed is not None:
            canvas = mx.where(held_fixed.mask, held_fixed.tokens, canvas)
        # Rows that finished on an earlier canvas still ride along in the
        # batch, but their passes do not count (as in the reference).
        resting = list(finished)
        stopped = [False] * B
        # Some running row was confident at the last read. Before the first
        # read nothing is known: a canvas that may stop at its first step
        # (stability threshold 0) is not run ahead, since most such canvases
        # do stop there and the step queued ahead would be thrown away.
        confident = True

        step = N
        start = CanvasState.start(canvas, params)
        pending = _queue(denoise_step(model, cache, start, params, step, rng.next(), held_fixed))
        while True:
            state, update, mean_entropy = pending
            # The stop check compares with the last S argmax canvases; before
            # S steps the history holds no canvas, so no row can stop yet.
            may_stop = N - step >= params.stability_threshold
            ahead = None
            if step > 1 and not (may_stop and confident):
                saved_keys = rng.keys
                ahead = _queue(
                    denoise_step(model, cache, state, params, step - 1, rng.next(), held_fixed, any(stopped))
                )
            denoised = [not r for r in resting]
            new_stopped = state.stopped.tolist()  # the step's one wait for the device
            mean_entropy = mean_entropy.tolist()
            if not all(math.isfinite(h) for h in mean_entropy):
                # NaN logits give NaN entropies; read anyway, so the check is free.
                raise NonFiniteError(
                    f"{getattr(model, 'path', None) or 'the model'}: the model produced non-finite values "
                    f"(canvas {canvas_index + 1}, step {N - step + 1}); its weights hold NaN or infinity"
                )
            resting = [a or b for a, b in zip(resting, new_stopped)]
            confident = any(h < params.confidence_threshold for h, r in zip(mean_entropy, resting) if not r)
            yield DenoisingStep(
                canvas_index,
                step,
                state.argmax,
                update.entropy,
                update.accepted,
                mean_entropy,
                new_stopped,
                denoised,
                update.fixed_logprob,
            )
            done = all(resting) or step == 1
            if ahead is not None and (done or new_stopped != stopped):
                # Moot: dropped, and its keys go to whatever runs next.
                ahead, rng.keys = None, saved_keys
            if done:
                break
            if ahead is None:
                ahead = _queue(
                    denoise_step(model, cache, state, params, step - 1, rng.next(), held_fixed, any(new_stopped))
                )
            stopped = new_stopped
            pending = ahead
            step -= 1

        rows = state.argmax.tolist()
        commit = CanvasCommit(
            canvas_index, step, [not f for f in finished], [[] for _ in range(B)], [None] * B, [None] * B, [0] * B
        )
        last_canvas = canvas_index == n_canvases - 1
        for r in range(B):
            if finished[r]:
                continue
            ids, stop_token = sampler.split_at_eos(rows[r], params.eos_token_id)
            commit.valid_tokens[r] = len(ids) + (stop_token is not None)
            budget = max_tokens - committed[r]
            if len(ids) >= budget:
                ids, stop_token = ids[:budget], None
            committed[r] += len(ids)
            if stop_token is not None:
                finish = "stop"
            elif committed[r] >= max_tokens or last_canvas:
                finish = "length"
            else:
                finish = None
            commit.tokens[r], commit.stop_tokens[r], commit.finish_reasons[r] = ids, stop_token, finish
            finished[r] = finish is not None
        if not all(finished):
            # The committed canvas becomes context for the next one; queued
            # now, it runs while the caller handles the commit.
            model.encode(state.argmax, cache)
            mx.async_eval([c.state for c in cache])
        yield commit
        if all(finished):
            return


# -- Prompts, responses and statistics ----------------------------------------


@dataclass
class GenerationResponse:
    """One event of ``stream_generate``: a denoising step or a committed canvas.

    ``text`` and ``token_ids`` are what this event commits (empty during
    denoising); ``draft`` is the current argmax canvas as text (cut at the
    first EOS), read back and decoded only when asked for.
    """

    text: str
    token_ids: List[int]
    canvas_index: int
    step: int  # counts down from max_denoising_steps to 1 within a canvas
    max_denoising_steps: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    denoising_steps: int
    tokens_per_forward: float
    peak_memory: float
    finish_reason: Optional[str]
    stop_token: Optional[int] = None  # the EOS id that ended the row, if any
    row: int = 0
    _argmax: Optional[mx.array] = field(default=None, repr=False)  # the step's [B, C] argmax canvas
    _eos: Sequence[int] = field(default=(), repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def draft_ids(self) -> List[int]:
        if self._argmax is None:
            return []
        return sampler.split_at_eos(self._argmax[self.row].tolist(), self._eos)[0]

    @property
    def draft(self) -> str:
        if self._tokenizer is None or self._argmax is None:
            return ""
        return self._tokenizer.decode(self.draft_ids)


PROMPT_TYPES = "a string, a list of token ids, or a list of those"


def text_ids(tokenizer, text: str, bos: bool = True) -> List[int]:
    """A raw text prompt's ids, starting with ``<bos>`` (with ``bos``) unless
    the text already spells it: the model only ever saw text after ``<bos>``
    (the chat template writes it; Gemma 4's tokenizer does not add it, so
    mlx-lm's ``encode(prompt)`` would not either)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    start = getattr(tokenizer, "bos_token_id", None)
    if bos and start is not None and ids[:1] != [start]:
        ids.insert(0, start)
    return ids


def _as_batch(tokenizer, prompt, vocab_size: int, what: str = "prompt", bos: bool = True) -> List[List[int]]:
    """A prompt (text or ids) or a list of prompts -> list of id lists.

    Text is read as ``text_ids`` reads it (``bos``: after ``<bos>``); ids are
    used as given. ``what`` names the argument in errors."""
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and _all_ids(prompt)):
        rows, batched = [prompt], False
    elif isinstance(prompt, (list, tuple)):
        rows, batched = list(prompt), True
    else:
        raise TypeError(f"{what} must be {PROMPT_TYPES} (got {type(prompt).__name__})")
    if not rows:
        raise ValueError(f"{what} is empty")
    batch = []
    for r, p in enumerate(rows):
        name = f"{what} {r}" if batched else what
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"{name} is text but the model has no tokenizer; pass token ids")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{name} is not valid text: {e.reason} at character {e.start}") from None
            ids = text_ids(tokenizer, p, bos)
        elif isinstance(p, (list, tuple)) and _all_ids(p):
            ids = [int(t) for t in p]
        else:
            raise TypeError(f"{name} must be a string or a list of token ids (got {type(p).__name__})")
        if not ids or not p:  # "" would be <bos> alone: a prompt that says nothing is a mistake
            raise ValueError(f"{name} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        batch.append(ids)
    return batch


def _all_ids(values) -> bool:
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values)


def _initial_canvases(initial_canvas, batch: int, canvas_length: int, vocab: int):
    if initial_canvas is None:
        return None
    canvas = mx.array(initial_canvas).astype(sampler.TOKEN_DTYPE)
    if canvas.ndim == 1:
        canvas = mx.broadcast_to(canvas[None], (batch, canvas.shape[0]))
    if canvas.shape != (batch, canvas_length):
        raise ValueError(
            f"initial_canvas must have shape [{canvas_length}] or [{batch}, {canvas_length}] (got {list(canvas.shape)})"
        )
    if mx.any((canvas < 0) | (canvas >= vocab)).item():
        raise ValueError(f"initial_canvas holds ids outside [0, {vocab})")
    return canvas


def encode_prompt(model: Model, batch: List[List[int]], cache: PromptCache) -> int:
    """Left-pad the rows to one length and encode them; returns the padded length."""
    length = max(len(p) for p in batch)
    pad = model.args.pad_token_id
    padding = [length - len(p) for p in batch]
    ids = mx.array([[pad] * n + p for n, p in zip(padding, batch)])
    left_padding = padding if any(padding) else None
    if left_padding is not None and cache.offset:
        raise ValueError("a cached prompt can only be continued by rows of equal length")
    for start in range(0, length, PREFILL_STEP):
        model.encode(ids[:, start : start + PREFILL_STEP], cache, left_padding=left_padding)
        left_padding = None
        mx.eval([c.state for c in cache])
    return length


SEED_LIMIT = 2**64  # MLX's PRNG keys are 64-bit


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an integer in [0, 2**64); TypeError or ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer (got {seed!r})")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64) (got {seed})")
    return int(seed)


def row_seeds(seed, batch: int) -> List[int]:
    """Row r draws from its own seed (seed + r, wrapping at 2**64), so a row
    gives in a batch what it gives alone. ``seed`` may list one seed per row."""
    if seed is None:
        seed = secrets.randbits(62)
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        if len(seeds) != batch:
            raise ValueError(f"seed lists {len(seeds)} seeds for {batch} prompts")
        return seeds
    seed = check_seed(seed)
    return [(seed + r) % SEED_LIMIT for r in range(batch)]


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    seed: Optional[int] = None,
    initial_canvas=None,
    prompt_cache: Optional[PromptCache] = None,
    **params,
) -> Iterator[GenerationResponse]:
    """Generate text canvas by canvas, yielding a response per denoising step.

    ``prompt`` is a string, a list of token ids, or a list of those (a batch:
    rows are left-padded and finish independently; each response carries its
    ``row``). A string is raw text (apply a chat template first for chat
    models), read after ``<bos>`` unless it spells it or ``prompt_cache``
    already holds context; ids are used as given. ``params`` are the sampler settings (``max_denoising_steps``,
    ``t_min``, ``t_max``, ``entropy_bound``, ``stability_threshold``,
    ``confidence_threshold``), defaulting to the checkpoint's generation config.
    ``prompt_cache`` (from ``model.make_cache()``) keeps the encoded
    conversation across calls.
    """
    sp = SamplerParams.resolve(model, **params)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens})")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    batch = _as_batch(tokenizer, prompt, model.args.vocab_size, bos=cache.offset == 0)
    B, C, V = len(batch), model.canvas_length, model.args.vocab_size
    context = cache.offset + max(len(p) for p in batch)
    # Every canvas max_tokens may need takes its C positions after the prompt.
    needed = context + math.ceil(max_tokens / C) * C
    if needed > model.args.max_position_embeddings:
        raise ValueError(
            f"prompt is too long for max_tokens={max_tokens}: {context} prompt tokens plus "
            f"{math.ceil(max_tokens / C)} canvas(es) of {C} need {needed} positions, more than the "
            f"model's context of {model.args.max_position_embeddings}"
        )
    first_canvas = _initial_canvases(initial_canvas, B, C, V)
    seeds = row_seeds(seed, B)

    tic = time.perf_counter()
    prompt_tokens = encode_prompt(model, batch, cache)
    prompt_time = time.perf_counter() - tic
    prompt_tps = B * prompt_tokens / max(prompt_time, 1e-9)

    # mlx-lm's wrapper hands out a fresh detokenizer each time: one per row.
    detokenizers = None if tokenizer is None else [tokenizer.detokenizer for _ in range(B)]
    finished = [False] * B
    committed = [0] * B  # tokens returned per row (EOS excluded)
    valid = [0] * B  # non-pad tokens per row, EOS included: the reference's tokens/forward
    forward_passes = [0] * B
    total_steps = 0
    tic = time.perf_counter()

    def response(row, event, text="", ids=(), finish_reason=None, stop_token=None, argmax=None):
        elapsed = max(time.perf_counter() - tic, 1e-9)
        return GenerationResponse(
            text=text,
            token_ids=list(ids),
            canvas_index=event.canvas_index,
            step=event.step,
            max_denoising_steps=sp.max_denoising_steps,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tps,
            generation_tokens=committed[row],
            generation_tps=sum(committed) / elapsed,
            denoising_steps=total_steps,
            tokens_per_forward=valid[row] / max(forward_passes[row], 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            stop_token=stop_token,
            row=row,
            _argmax=argmax,
            _eos=sp.eos_token_id,
            _tokenizer=tokenizer,
        )

    for event in generate_step(model, cache, seeds, max_tokens, sp, first_canvas):
        if isinstance(event, DenoisingStep):
            total_steps += 1
            for r in range(B):
                forward_passes[r] += event.denoised[r]
            for r in range(B):
                if not finished[r]:
                    yield response(r, event, argmax=event.argmax)
            continue
        for r in range(B):
            if not event.active[r]:
                continue
            ids, finish = event.tokens[r], event.finish_reasons[r]
            valid[r] += event.valid_tokens[r]
            committed[r] += len(ids)
            text = ""
            if detokenizers:
                for t in ids:
                    detokenizers[r].add_token(t)
                if finish:
                    detokenizers[r].finalize()
                text = detokenizers[r].last_segment
            finished[r] = finish is not None
            yield response(r, event, text, ids, finish, event.stop_tokens[r])


class Progress:
    """Denoising steps per canvas, counted from a stream of responses."""

    def __init__(self):
        self.steps: Dict[int, int] = {}

    def update(self, response: GenerationResponse):
        # ``step`` counts down from max_denoising_steps to 1 within a canvas.
        self.steps[response.canvas_index] = response.max_denoising_steps - response.step + 1

    def status(self, response: GenerationResponse) -> str:
        return (
            f"canvas {response.canvas_index + 1}, "
            f"step {self.steps.get(response.canvas_index, 0)}/{response.max_denoising_steps}"
        )


def print_stats(last: GenerationResponse, progress: Progress, conversation_tokens: Optional[int] = None, file=None):
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


def generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    verbose: bool = False,
    **params,
) -> Union[str, List[str]]:
    """Generate a completion for ``prompt`` (or a list for a batch of prompts)."""
    is_batch = _is_batch(prompt)
    texts: Dict[int, str] = {}
    last = None
    progress = Progress()
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **params):
        progress.update(last)
        if last.text or last.row not in texts:
            texts[last.row] = texts.get(last.row, "") + last.text
        if verbose and not is_batch and last.text:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last, progress)
    if is_batch:
        return [texts.get(i, "") for i in range(len(texts))]
    return texts.get(0, "")


def _is_batch(prompt) -> bool:
    if isinstance(prompt, mx.array):
        return prompt.ndim == 2
    return isinstance(prompt, (list, tuple)) and not _all_ids(prompt)


if __name__ == "__main__":
    # The command line lives in the cli package; the library never imports it.
    from .cli.generate import main

    main()
