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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

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

    def next(self, held: Optional[List[bool]] = None) -> List[mx.array]:
        """A key per row. Rows ``held`` (a stopped row, whose samples are
        thrown away) get their chain's current key and their chains wait, so
        the row's next canvas draws what it would draw alone."""
        if held is None or not any(held):
            pairs = [mx.random.split(k) for k in self.keys]
            self.keys = [p[0] for p in pairs]
            return [p[1] for p in pairs]
        out = []
        for r, (key, hold) in enumerate(zip(self.keys, held)):
            if hold:
                out.append(key)
            else:
                self.keys[r], sub = mx.random.split(key)
                out.append(sub)
        return out


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


def denoise_canvas(
    model: Model,
    cache: PromptCache,
    canvas: mx.array,
    params: SamplerParams,
    rng: RowKeys,
    canvas_index: int = 0,
    fixed: Optional[sampler.FixedPositions] = None,
    resting: Optional[List[bool]] = None,
    hold_keys: bool = False,
) -> Iterator[DenoisingStep]:
    """Denoise one canvas [B, C]: a ``DenoisingStep`` per step until every row
    stopped or ``max_denoising_steps`` is reached; the last one's ``argmax``
    is the canvas to commit. The cache is left as it is.

    ``resting`` marks rows that ride along without counting (finished on an
    earlier canvas). ``hold_keys``: a stopped row's key chain waits while the
    others go on (``RowKeys.next``), so every row draws what it draws alone
    (the batch engine's rule; ``generate_step`` advances every chain).

    While the canvas cannot stop or is far from confident, the next step's
    graph is built and queued before the host reads this step's stop flags;
    a queued step the read makes moot (the canvas stopped, or a row stopped
    and must now be held) is dropped and its keys reused, so results never
    depend on it; so is one pending when the caller closes the generator.
    """
    N = params.max_denoising_steps
    resting = [False] * canvas.shape[0] if resting is None else list(resting)
    stopped = [False] * canvas.shape[0]

    def keys(known_stopped):
        return rng.next([a or b for a, b in zip(resting, known_stopped)] if hold_keys else None)

    # Some running row was confident at the last read. Before the first
    # read nothing is known: a canvas that may stop at its first step
    # (stability threshold 0) is not run ahead, since most such canvases
    # do stop there and the step queued ahead would be thrown away.
    confident = True

    step = 1
    start = CanvasState.start(canvas, params)
    pending = _queue(denoise_step(model, cache, start, params, step, keys(stopped), fixed))
    while True:
        state, update, mean_entropy = pending
        # The stop check compares with the last S argmax canvases; before
        # S steps the history holds no canvas, so no row can stop yet.
        may_stop = step - 1 >= params.stability_threshold
        ahead = None
        if step < N and not (may_stop and confident):
            saved_keys = list(rng.keys)
            ahead = _queue(denoise_step(model, cache, state, params, step + 1, keys(stopped), fixed, any(stopped)))
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
        try:
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
        except GeneratorExit:
            # Closed here (the caller ended the canvas): the step queued ahead
            # is dropped and its keys handed back, as when the read makes it moot.
            if ahead is not None:
                rng.keys = saved_keys
            raise
        done = all(resting) or step == N
        if ahead is not None and (done or new_stopped != stopped):
            # Moot: dropped, and its keys go to whatever runs next.
            ahead, rng.keys = None, saved_keys
        if done:
            return
        if ahead is None:
            ahead = _queue(
                denoise_step(model, cache, state, params, step + 1, keys(new_stopped), fixed, any(new_stopped))
            )
        stopped = new_stopped
        pending = ahead
        step += 1


def commit_row(
    argmax: List[int], params: SamplerParams, committed: int, max_tokens: int, last_canvas: bool
) -> Tuple[List[int], Optional[int], Optional[str], int]:
    """What a committed canvas adds to a row that has ``committed`` tokens:
    (its tokens, cut at the first EOS and at ``max_tokens``; the EOS that
    ended the row, if any; the finish reason, "stop", "length" or None while
    canvases follow; the reference's valid count, tokens before the EOS plus
    the EOS)."""
    ids, stop_token = sampler.split_at_eos(argmax, params.eos_token_id)
    valid = len(ids) + (stop_token is not None)
    budget = max_tokens - committed
    if len(ids) >= budget:
        ids, stop_token = ids[:budget], None
    if stop_token is not None:
        finish = "stop"
    elif committed + len(ids) >= max_tokens or last_canvas:
        finish = "length"
    else:
        finish = None
    return ids, stop_token, finish, valid


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
    entropies (``denoise_canvas`` runs the steps, queueing ahead).
    """
    B, C, V = len(seeds), model.canvas_length, model.args.vocab_size
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
        for event in denoise_canvas(model, cache, canvas, params, rng, canvas_index, held_fixed, finished):
            yield event

        rows = event.argmax.tolist()
        commit = CanvasCommit(
            canvas_index, event.step, [not f for f in finished], [[] for _ in range(B)], [None] * B, [None] * B, [0] * B
        )
        last_canvas = canvas_index == n_canvases - 1
        for r in range(B):
            if finished[r]:
                continue
            ids, stop_token, finish, valid = commit_row(rows[r], params, committed[r], max_tokens, last_canvas)
            committed[r] += len(ids)
            commit.tokens[r], commit.stop_tokens[r], commit.finish_reasons[r] = ids, stop_token, finish
            commit.valid_tokens[r] = valid
            finished[r] = finish is not None
        if not all(finished):
            # The committed canvas becomes context for the next one; queued
            # now, it runs while the caller handles the commit.
            model.encode(event.argmax, cache)
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
    check_max_tokens(max_tokens)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    batch = as_batch(tokenizer, prompt, model.args.vocab_size, bos=cache.offset == 0)
    batched = _is_batch(prompt)
    prepared = [prepare_images(model, row) if row else [] for row in rows_of_images(images, len(batch), batched)]
    batch = [
        place_images(model, ids, row, f"prompt {r}" if batched else "prompt")
        for r, (ids, row) in enumerate(zip(batch, prepared))
    ]
    B, C, V = len(batch), model.canvas_length, model.args.vocab_size
    check_context(model, cache.offset + max(len(p) for p in batch), max_tokens)
    first_canvas = initial_canvases(initial_canvas, B, C, V)
    seeds = row_seeds(seed, B)

    tic = time.perf_counter()
    features = [image_features(model, row) for row in prepared] if any(prepared) else None
    prompt_tokens = encode_prompt(model, batch, cache, features)
    prompt_time = time.perf_counter() - tic
    prompt_tps = B * prompt_tokens / max(prompt_time, 1e-9)

    rows = [RowOutput(tokenizer, sp, prompt_tokens, prompt_tps, r) for r in range(B)]
    total_steps = 0
    tic = time.perf_counter()

    def tps():
        return sum(row.committed for row in rows) / max(time.perf_counter() - tic, 1e-9)

    for event in generate_step(model, cache, seeds, max_tokens, sp, first_canvas):
        if isinstance(event, DenoisingStep):
            total_steps += 1
            for r, row in enumerate(rows):
                row.forward_passes += event.denoised[r]
            for row in rows:
                if not row.finished:
                    yield row.step(event, event.argmax, tps(), total_steps)
            continue
        for r, row in enumerate(rows):
            if event.active[r]:
                text = row.add(event.tokens[r], event.valid_tokens[r], event.finish_reasons[r])
                yield row.commit(event, r, text, tps(), total_steps)


class RowOutput:
    """One row's committed text and statistics, as ``GenerationResponse``s:
    ``stream_generate``'s rows and the batch engine's (``batch.Batch``)."""

    def __init__(self, tokenizer, params: SamplerParams, prompt_tokens: int, prompt_tps: float, row: int = 0):
        self.tokenizer, self.params, self.row = tokenizer, params, row
        self.prompt_tokens, self.prompt_tps = prompt_tokens, prompt_tps
        # mlx-lm's wrapper hands out a fresh detokenizer each time: one per row.
        self.detokenizer = None if tokenizer is None else tokenizer.detokenizer
        self.committed = 0  # tokens returned (EOS excluded)
        self.valid = 0  # non-pad tokens, EOS included: the reference's tokens/forward
        self.forward_passes = 0
        self.finished = False

    def add(self, ids: List[int], valid: int, finish_reason: Optional[str]) -> str:
        """Take a canvas' share for this row; returns the text it adds."""
        self.valid += valid
        self.committed += len(ids)
        self.finished = finish_reason is not None
        if self.detokenizer is None:
            return ""
        for t in ids:
            self.detokenizer.add_token(t)
        if finish_reason:
            self.detokenizer.finalize()
        return self.detokenizer.last_segment

    def step(self, event: DenoisingStep, argmax: mx.array, generation_tps: float, steps: int) -> GenerationResponse:
        """The response for a denoising step; ``argmax`` holds the row's draft at index ``row``."""
        return self._response(event, generation_tps, steps, argmax=argmax, positions=event.positions)

    def commit(self, event: CanvasCommit, r: int, text: str, generation_tps: float, steps: int) -> GenerationResponse:
        """The response for a committed canvas, whose row ``r`` this row is."""
        ids, finish = event.tokens[r], event.finish_reasons[r]
        return self._response(event, generation_tps, steps, text, ids, finish, event.stop_tokens[r])

    def _response(
        self,
        event,
        generation_tps,
        steps,
        text="",
        ids=(),
        finish_reason=None,
        stop_token=None,
        argmax=None,
        positions=0,
    ) -> GenerationResponse:
        return GenerationResponse(
            text=text,
            token_ids=list(ids),
            canvas_index=event.canvas_index,
            step=event.step,
            max_denoising_steps=self.params.max_denoising_steps,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=self.committed,
            generation_tps=generation_tps,
            denoising_steps=steps,
            tokens_per_forward=self.valid / max(self.forward_passes, 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            stop_token=stop_token,
            row=self.row,
            positions=positions,
            _argmax=argmax,
            _eos=self.params.eos_token_id,
            _tokenizer=self.tokenizer,
        )


def check_max_tokens(max_tokens):
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens})")


def check_context(model: Model, context: int, max_tokens: int):
    """A ValueError unless ``context`` prompt tokens and every canvas
    ``max_tokens`` may need (each takes its C positions) fit the model."""
    C = model.canvas_length
    needed = context + math.ceil(max_tokens / C) * C
    if needed > model.args.max_position_embeddings:
        raise ValueError(
            f"prompt is too long for max_tokens={max_tokens}: {context} prompt tokens plus "
            f"{math.ceil(max_tokens / C)} canvas(es) of {C} need {needed} positions, more than the "
            f"model's context of {model.args.max_position_embeddings}"
        )


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
