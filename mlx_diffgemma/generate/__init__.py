"""Block-diffusion generation, layered as mlx-lm's generate.py is.

- ``generate_step`` runs the canvases for context already in the cache: for
  each canvas it starts from uniform noise, denoises it for up to
  ``max_denoising_steps`` steps (``denoising.denoise_step``; stopping early
  once it is stable and confident), commits its argmax tokens and encodes them
  into the cache so the next canvas sees them. It yields a ``DenoisingStep``
  per step (counted from 1 within a canvas) and a ``CanvasCommit`` per canvas:
  token ids and device arrays, no text, no timing.
- ``stream_generate`` encodes the prompt and turns those events into
  ``GenerationResponse``s: detokenized text, drafts and statistics.
- ``generate`` collects a stream (and prints it with ``verbose``); ``chat``,
  infilling, the command lines, the server and the benchmark build on the
  same pieces.

Sampler settings are resolved once, where a call enters (``sampler_params``),
and travel down resolved. docs/generation.md describes the layers and what a
step waits for.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

# Besides what this module uses, the names it held before the sampler's
# settings, the step, prompts and statistics moved out, so that code written
# against ``mlx_diffgemma.generate`` keeps working.
from .. import sampler
from ..cache import PromptCache
from ..denoising import CanvasState, denoise_step, sample_step, uses_probs  # noqa: F401
from ..image_prompts import image_features, place_images, prepare_images, rows_of_images
from ..model import Model
from ..prompts import (  # noqa: F401
    PREFILL_STEP,
    PROMPT_TYPES,
    SEED_LIMIT,
    Prompt,
    all_ids,
    as_batch,
    check_seed,
    encode_prompt,
    initial_canvases,
    row_seeds,
    text_ids,
)
from ..sampler_params import (  # noqa: F401
    FAST,
    SAMPLER_SETTINGS,
    SETTING_INFO,
    SamplerParams,
    check_setting,
    sampler_params,
    setting_problem,
)
from ..stats import Progress, print_stats  # noqa: F401

# -- The canvas loop ----------------------------------------------------------


@dataclass
class DenoisingStep:
    """``generate_step``'s event after each denoising step.

    The arrays are the step's own (already evaluated); reading one back to the
    host is up to the caller. Rows in ``stopped`` keep their canvas until the
    canvas is committed.
    """

    canvas_index: int
    step: int  # 1 to max_denoising_steps within a canvas
    argmax: mx.array  # [B, C] int32: what would be committed if the canvas stopped now
    entropy: mx.array  # [B, C] float32, nats (0 at fixed positions)
    accepted: mx.array  # [B, C] bool: positions whose sample survives into the next step
    mean_entropy: List[float]  # per row: the stop check's confidence measure
    stopped: List[bool]  # rows whose canvas has stopped, at this step or before
    denoised: List[bool]  # rows this step counted as a forward pass for
    # [B, C] float32: log-probability the step gives each fixed position's
    # token (0 elsewhere); None on canvases without fixed positions.
    fixed_logprob: Optional[mx.array] = None
    positions: int = 0  # canvas positions per row the step's decoder pass computed


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
    step: int  # the step the canvas stopped at: how many it took
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
        state.streak,
        state.committed,
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

        step = 1
        start = CanvasState.start(canvas, params)
        pending = _queue(denoise_step(model, cache, start, params, step, rng.next(), held_fixed))
        while True:
            state, update, mean_entropy = pending
            # The stop check compares with the last S argmax canvases; before
            # S steps the history holds no canvas, so no row can stop yet.
            may_stop = step - 1 >= params.stability_threshold
            ahead = None
            if step < N and not (may_stop and confident):
                saved_keys = rng.keys
                ahead = _queue(
                    denoise_step(model, cache, state, params, step + 1, rng.next(), held_fixed, any(stopped))
                )
            denoised = [not r for r in resting]
            new_stopped = state.stopped.tolist()  # the step's one wait for the device
            mean_entropy = mean_entropy.tolist()
            if not all(math.isfinite(h) for h in mean_entropy):
                # NaN logits give NaN entropies; read anyway, so the check is free.
                raise NonFiniteError(
                    f"{model.path or 'the model'}: the model produced non-finite values "
                    f"(canvas {canvas_index + 1}, step {step}); its weights hold NaN or infinity"
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
                state.positions,
            )
            done = all(resting) or step == N
            if ahead is not None and (done or new_stopped != stopped):
                # Moot: dropped, and its keys go to whatever runs next.
                ahead, rng.keys = None, saved_keys
            if done:
                break
            if ahead is None:
                ahead = _queue(
                    denoise_step(model, cache, state, params, step + 1, rng.next(), held_fixed, any(new_stopped))
                )
            stopped = new_stopped
            pending = ahead
            step += 1

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


# -- Responses -----------------------------------------------------------------


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
    step: int  # 1 to max_denoising_steps within a canvas
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
    # Canvas positions per row this step's decoder pass computed: the canvas
    # length, fewer for an approximate step (``reuse_committed``); 0 on a commit.
    positions: int = 0
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


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    seed: Optional[int] = None,
    initial_canvas=None,
    prompt_cache: Optional[PromptCache] = None,
    params: Optional[SamplerParams] = None,
    images=None,
    **settings,
) -> Iterator[GenerationResponse]:
    """Generate text canvas by canvas, yielding a response per denoising step.

    ``prompt`` is a string, a list of token ids, or a list of those (a batch:
    rows are left-padded and finish independently; each response carries its
    ``row``). A string is raw text (apply a chat template first for chat
    models), read after ``<bos>`` unless it spells it or ``prompt_cache``
    already holds context; ids are used as given.

    ``images`` (for a checkpoint with a vision tower): the prompt's images,
    paths, http(s) or data URLs, encoded bytes or PIL images, in the order of
    the prompt's image tokens (``<|image|>``, one per image: chat templates
    write them for image parts); for a batch, one list per prompt.

    The sampler's settings are ``params`` (``SamplerParams.resolve(model,
    ...)``), or keyword ``settings`` (``max_denoising_steps``, ``t_min``,
    ``t_max``, ``entropy_bound``, ``stability_threshold``,
    ``confidence_threshold``, ``self_conditioning_top_k``, ``accept_threshold``,
    ``commit_after``, ``reuse_committed``, ``fast``), each
    defaulting to the checkpoint's generation config. ``prompt_cache`` (from
    ``model.make_cache()``) keeps the encoded conversation across calls.
    """
    sp = sampler_params(model, params, settings)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens})")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    batch = as_batch(tokenizer, prompt, model.args.vocab_size, bos=cache.offset == 0)
    batched = _is_batch(prompt)
    prepared = [prepare_images(model, row) if row else [] for row in rows_of_images(images, len(batch), batched)]
    batch = [
        place_images(model, ids, row, f"prompt {r}" if batched else "prompt")
        for r, (ids, row) in enumerate(zip(batch, prepared))
    ]
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
    first_canvas = initial_canvases(initial_canvas, B, C, V)
    seeds = row_seeds(seed, B)

    tic = time.perf_counter()
    features = [image_features(model, row) for row in prepared] if any(prepared) else None
    prompt_tokens = encode_prompt(model, batch, cache, features)
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

    def response(row, event, text="", ids=(), finish_reason=None, stop_token=None, argmax=None, positions=0):
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
            positions=positions,
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
                    yield response(r, event, argmax=event.argmax, positions=event.positions)
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


def generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> Union[str, List[str]]:
    """Generate a completion for ``prompt`` (or a list for a batch of prompts);
    ``kwargs`` as ``stream_generate`` takes them (``seed``, ``params``, settings)."""
    is_batch = _is_batch(prompt)
    texts: Dict[int, str] = {}
    last = None
    progress = Progress()
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
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
    return isinstance(prompt, (list, tuple)) and not all_ids(prompt)
