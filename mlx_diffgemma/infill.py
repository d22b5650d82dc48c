"""Writing between known text: infilling and in-line editing.

Every position of a canvas attends to every other, so a canvas can hold text
that is already known beside positions still to be written. The known tokens
are *fixed* (``sampler.FixedPositions``): never resampled or renoised, in the
argmax canvas at every step; the model writes the free positions to agree with
what comes before them (in the cache) and what comes after them (in the
canvas).

A *document* is the text after the prompt as token ids, some positions free
(``Layout``). ``fill`` writes it window by window, left to right: the fixed
text before the next free position is encoded into the cache, then one canvas
starts at that position and holds the next ``canvas_length`` tokens of the
document, free and fixed, and is denoised; its tokens join the cache if free
positions remain after it. So a free position sees the whole document before
it but only the fixed text within its own window after it: text more than a
canvas past a gap is never read (docs/infill.md).

- ``stream_infill`` / ``infill``: a gap between a prefix (the prompt) and a
  suffix. A given length is one row; an automatic length runs every candidate
  length as a row of one batch and keeps the one whose suffix the model finds
  most likely (``suffix_agreement``).
- ``stream_edit`` / ``edit``: character spans of a text rewritten in place,
  optionally with an instruction as the user turn of the chat template.
"""

import math
import reprlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import mlx.core as mx

from . import sampler
from .cache import PromptCache
from .chat_template import plain_ids, render
from .generate import DenoisingStep, GenerationResponse, generate_step, stream_generate
from .model import Model
from .prompts import SEED_LIMIT, as_batch, encode_prompt, row_seeds
from .sampler_params import SamplerParams, sampler_params
from .thinking import END_OF_TURN

Text = Union[str, Sequence[int]]

# Automatic gap lengths: every length up to 16 tokens, then about 1.5x apart,
# leaving at least a quarter of the canvas to the suffix (a handful of suffix
# tokens can agree with a wrong gap by chance). One row of the batch per
# candidate (docs/infill.md measures the rule); longer gaps need their length.
EXACT_LENGTHS = 16
SUFFIX_SHARE = 4  # the suffix keeps at least 1/4 of the canvas
TIE = 1e-3  # nats: agreements this close are a tie, which the shorter gap (more suffix seen) wins
CONTEXT_TOKENS = 64  # document tokens before a window a response keeps, for showing the line it is on


def candidate_lengths(canvas_length: int) -> List[int]:
    """The gap lengths an automatic infill tries: every one up to 16, then
    ~1.5x apart, up to the length that leaves a quarter of the canvas."""
    top = max(1, canvas_length - max(1, canvas_length // SUFFIX_SHARE))
    lengths = list(range(1, min(EXACT_LENGTHS, top) + 1))
    while lengths[-1] < top:
        lengths.append(min(top, math.ceil(lengths[-1] * 1.5)))
    return lengths


@dataclass
class Layout:
    """A document: its ids and which of them are to be written (values there are ignored)."""

    tokens: List[int]
    free: List[bool]

    @classmethod
    def of(cls, pieces: Sequence[Tuple[Sequence[int], bool]]) -> "Layout":
        """Pieces of (ids, free) joined; a free piece's ids only give its length."""
        tokens, free = [], []
        for ids, is_free in pieces:
            tokens += [0] * len(ids) if is_free else list(ids)
            free += [is_free] * len(ids)
        return cls(tokens, free)

    def next_free(self, start: int) -> Optional[int]:
        return next((i for i in range(start, len(self.free)) if self.free[i]), None)

    def fixed_read(self, canvas_length: int) -> int:
        """Known tokens the model reads filling this layout (as ``fill`` walks
        it): those before each window and in it, up to the last window's end."""
        pos = 0
        while (start := self.next_free(pos)) is not None:
            pos = min(start + canvas_length, len(self.tokens))
        return pos - sum(self.free[:pos])


@dataclass
class FillStep:
    """``fill``'s event after each denoising step of a window."""

    window: int
    start: int  # document position of the window's first token
    event: DenoisingStep
    fixed: List[List[bool]]  # per row, the window's fixed positions (the same all window)
    documents: List[List[int]]  # each row's document, written up to ``start``


def fill(
    model: Model,
    cache: PromptCache,
    layouts: List[Layout],
    seeds: List[int],
    params: SamplerParams,
) -> Iterator[Union[FillStep, List[List[int]]]]:
    """Write the free positions of each row's document after the context in ``cache``.

    Yields a ``FillStep`` per denoising step, then the documents written (one
    id list per row). Window ``k`` of row ``r`` draws from ``seeds[r] + k``.
    Several rows must share their text before the first free position and
    have every free position in the first window (the candidate lengths of
    one infill); one row may have any layout.
    """
    C = model.canvas_length
    docs = [list(layout.tokens) for layout in layouts]
    head = layouts[0]
    if len(layouts) > 1:
        first = head.next_free(0)
        for r, layout in enumerate(layouts):
            free = [i for i, f in enumerate(layout.free) if f]
            if free and (free[0] != first or free[-1] >= first + C or layout.tokens[:first] != head.tokens[:first]):
                raise ValueError(
                    f"row {r}: several rows must share their text before one window holding every free position"
                )
    pos, window = 0, 0
    while True:
        start = head.next_free(pos)
        if start is None:
            break
        if start > pos:
            model.encode(mx.array([d[pos:start] for d in docs]), cache)
        end = start + C
        mask = [[i < len(d) and not lay.free[i] for i in range(start, end)] for d, lay in zip(docs, layouts)]
        tokens = [[d[i] if m else 0 for i, m in zip(range(start, end), row)] for d, row in zip(docs, mask)]
        fixed = sampler.FixedPositions(mx.array(mask), mx.array(tokens, dtype=sampler.TOKEN_DTYPE))
        window_seeds = [(s + window) % SEED_LIMIT for s in seeds]
        final = None
        for event in generate_step(model, cache, window_seeds, C, params, fixed=fixed):
            if isinstance(event, DenoisingStep):
                final = event
                yield FillStep(window, start, event, mask, docs)
        written = final.argmax.tolist()  # the canvas as committed
        for d, lay, row in zip(docs, layouts, written):
            for i in range(start, min(end, len(d))):
                if lay.free[i]:
                    d[i] = row[i - start]
        pos = min(end, len(head.tokens))
        if head.next_free(pos) is not None:
            model.encode(mx.array([d[start:pos] for d in docs]), cache)
        window += 1
    yield docs


def suffix_agreement(step: FillStep) -> List[float]:
    """Per row: the mean log-probability the step gives the row's fixed tokens
    (an infill's suffix head), -inf for a row with none.

    A gap of the wrong length puts the suffix where the model expects other
    text, so its tokens become unlikely; of the lengths tried, the right one
    tends to make the suffix most likely (docs/infill.md measures it).
    """
    total = step.event.fixed_logprob.sum(axis=-1).tolist()  # 0 at free positions
    return [t / sum(row) if any(row) else -math.inf for t, row in zip(total, step.fixed)]


def best_row(agreement: List[float]) -> int:
    """The row that wins the automatic length: rows are in order of length, and
    the shortest within ``TIE`` of the best agreement wins (it saw the most suffix)."""
    top = max(agreement)
    return next(r for r, a in enumerate(agreement) if a >= top - TIE)


# -- Responses ----------------------------------------------------------------


@dataclass
class FillResponse:
    """One event of ``stream_infill`` / ``stream_edit``: a denoising step, or
    (``finished``) the result.

    ``draft_parts()`` gives the window being denoised as (text, fixed) runs:
    what the model is writing, and the known text beside it. It is read from
    the device only when asked for, as ``GenerationResponse.draft`` is.
    """

    window: int  # the canvas (window) this step denoises, from 0
    step: int  # 1 to max_denoising_steps within a window (0 on the result)
    max_denoising_steps: int
    denoising_steps: int  # steps so far, all windows
    prompt_tokens: int
    prompt_tps: float
    peak_memory: float
    finished: bool = False
    text: str = ""  # the result (the middle, or the edited text); set when finished
    length: Optional[int] = None  # tokens written (infill: the gap); set when finished
    scores: Optional[Dict[int, float]] = None  # automatic infill: suffix agreement per candidate length
    spans: Optional[List[Tuple[int, int]]] = None  # edit: where the spans now are in ``text``
    fixed_tokens: int = 0  # known tokens read beside the prompt (a suffix's head, an edit's kept text); when finished
    _parts: Optional[Callable[[bool], List[Tuple[str, bool]]]] = field(default=None, repr=False)
    _leading: Optional[Callable[[], int]] = field(default=None, repr=False)

    def draft_parts(self, context: bool = False) -> List[Tuple[str, bool]]:
        """The window as runs of (text, fixed), up to its first free end of
        sequence; ``context`` starts it with the document's text before the
        window on the same line (fixed)."""
        return self._parts(context) if self._parts is not None else []

    def leading_length(self) -> Optional[int]:
        """While an automatic infill denoises: the candidate length leading now."""
        return self._leading() if self._leading is not None else self.length


class _Run:
    """What every response of one call shares: the settings, counts and timing."""

    def __init__(self, model: Model, tokenizer, params: SamplerParams):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.steps = 0
        self.prompt_tokens = 0
        self.prompt_tps = 0.0

    def encode(self, prompt: List[int], cache: PromptCache):
        tic = time.perf_counter()
        self.prompt_tokens = encode_prompt(self.model, [prompt], cache)
        self.prompt_tps = self.prompt_tokens / max(time.perf_counter() - tic, 1e-9)

    def step(self, step: FillStep, layouts: List[Layout], lengths: Optional[List[int]] = None) -> FillResponse:
        """The response to one denoising step. With candidate ``lengths`` its
        draft shows the leading row; nothing is read back until it is asked for."""
        self.steps += 1

        def leading() -> int:
            return lengths[best_row(suffix_agreement(step))]

        def row() -> int:
            return lengths.index(leading()) if lengths and len(lengths) > 1 else 0

        def parts(context: bool) -> List[Tuple[str, bool]]:
            r = row()
            n = len(layouts[r].tokens) - step.start  # the window, cut at the document's end
            before = step.documents[r][max(0, step.start - CONTEXT_TOKENS) : step.start] if context else []
            return self._parts(step.event.argmax[r].tolist()[:n], step.fixed[r][:n], before)

        return self._response(
            window=step.window,
            step=step.event.step,
            _parts=parts,
            _leading=leading if lengths and len(lengths) > 1 else None,
        )

    def _parts(self, window: List[int], fixed: List[bool], before: List[int]) -> List[Tuple[str, bool]]:
        runs: List[Tuple[List[int], bool]] = []
        for token, is_fixed in zip(window, fixed):
            if not is_fixed and token in self.params.eos_token_id:
                break
            if runs and runs[-1][1] == is_fixed:
                runs[-1][0].append(token)
            else:
                runs.append(([token], is_fixed))
        parts = [(self.tokenizer.decode(ids), is_fixed) for ids, is_fixed in runs]
        line = self.tokenizer.decode(before).rsplit("\n", 1)[-1] if before else ""
        return [(line, True)] + parts if line else parts

    def result(self, text: str, **fields) -> FillResponse:
        return self._response(window=0, step=0, finished=True, text=text, **fields)

    def _response(self, **fields) -> FillResponse:
        return FillResponse(
            max_denoising_steps=self.params.max_denoising_steps,
            denoising_steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            peak_memory=mx.get_peak_memory() / 1e9,
            **fields,
        )


def _check_context(model: Model, cache: PromptCache, prompt: int, document: int, what: str):
    """The prompt, the document and its last window must fit the model's context."""
    needed = cache.offset + prompt + document + model.canvas_length
    limit = model.args.max_position_embeddings
    if needed > limit:
        raise ValueError(
            f"{what} is too long: {cache.offset + prompt} prompt tokens, {document} tokens after them and "
            f"a canvas of {model.canvas_length} need {needed} positions, more than the model's context of {limit}"
        )


def _ids(tokenizer, text: Text, what: str, vocab_size: int, bos: bool) -> List[int]:
    if isinstance(text, mx.array):
        text = text.tolist()
    if isinstance(text, (str, list, tuple)) and len(text) == 0:
        return []
    return as_batch(tokenizer, text, vocab_size, what, bos)[0]


def last(responses: Iterator[FillResponse]) -> FillResponse:
    """The last response of a stream: its result."""
    return deque(responses, maxlen=1)[0]


# -- Infilling ----------------------------------------------------------------


def stream_infill(
    model: Model,
    tokenizer,
    prefix: Text,
    suffix: Text,
    length: Union[int, Sequence[int], None] = None,
    seed: Optional[int] = None,
    max_tokens: int = 256,
    prompt_cache: Optional[PromptCache] = None,
    params: Optional[SamplerParams] = None,
    **settings,
) -> Iterator[FillResponse]:
    """Write the text between ``prefix`` and ``suffix``, yielding a response per step.

    ``prefix`` and ``suffix`` are text or token ids. Ids are used as given;
    text as ``stream_generate`` reads a prompt: a text prefix (or an empty
    one) starts from ``<bos>``, a text suffix is plain text.
    The prefix is encoded into the cache; the canvas holds the gap and then
    the head of the suffix, as much as fits, fixed. ``length`` is the gap in
    tokens; a list of lengths tries each as one row of a batch and keeps the
    one whose suffix the model finds most likely (``suffix_agreement``); None
    tries every ``candidate_lengths`` length up to ``max_tokens`` so. A given length longer than a canvas is
    written in several canvases, of which only the last sees the suffix. The
    middle ends at an end-of-sequence token the model writes inside the gap.
    With no suffix the gap is plain generation: it ends at the model's end of
    sequence, after at most ``length`` (or ``max_tokens``) tokens.

    The last response has ``finished`` set, the middle in ``text`` and its
    ``length``. ``params`` or keyword ``settings`` are the sampler's, as for
    ``stream_generate``; ``prompt_cache`` is the cache the prefix is encoded
    into (it keeps the prefix, not the middle).
    """
    sp = sampler_params(model, params, settings)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens!r})")
    C, V = model.canvas_length, model.args.vocab_size
    # A text prefix starts the document, after <bos> (unless the cache holds what comes
    # before it); a suffix continues it.
    fresh = prompt_cache is None or prompt_cache.offset == 0
    prefix_ids = _ids(tokenizer, prefix, "prefix", V, bos=fresh)
    suffix_ids = _ids(tokenizer, suffix, "suffix", V, bos=False)
    if not prefix_ids and not suffix_ids:
        raise ValueError("infill needs a prefix or a suffix (both are empty)")
    lengths = _lengths(length, C, max_tokens)
    if not prefix_ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("prefix is empty and the tokenizer has no <bos> to start from")
        prefix_ids = [bos]
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    if not suffix_ids:
        limit = max_tokens if length is None else max(lengths)
        yield from _generate_gap(model, tokenizer, prefix_ids, limit, seed, cache, sp)
        return

    _check_context(model, cache, len(prefix_ids), max(lengths) + len(suffix_ids), "infill")
    run = _Run(model, tokenizer, sp)
    run.encode(prefix_ids, cache)
    rows = len(lengths)
    if rows > 1:
        cache = cache.repeat(rows)
    layouts = [Layout.of([([0] * n, True), (suffix_ids, False)]) for n in lengths]
    # Every candidate starts from the same noise, so they differ only in length.
    seeds = row_seeds(seed, 1) * rows
    final = None
    for event in fill(model, cache, layouts, seeds, sp):
        if isinstance(event, FillStep):
            final = event
            yield run.step(event, layouts, lengths)
            continue
        docs = event
    # A row that stopped is held, so the last step has every row's final agreement.
    scores, best = None, 0
    if rows > 1:
        agreement = suffix_agreement(final)
        scores, best = dict(zip(lengths, agreement)), best_row(agreement)
    # An end of sequence inside the gap ends the text there, as it ends an answer.
    middle, _ = sampler.split_at_eos(docs[best][: lengths[best]], sp.eos_token_id)
    yield run.result(
        tokenizer.decode(middle, skip_special_tokens=True),
        length=len(middle),
        scores=scores,
        fixed_tokens=layouts[best].fixed_read(C),
    )


def _lengths(length, canvas_length: int, max_tokens: int) -> List[int]:
    """The gap lengths to try: ``length`` given (one or a list), else the candidates up to ``max_tokens``."""
    if length is None:
        return [n for n in candidate_lengths(canvas_length) if n <= max_tokens]
    lengths = list(length) if isinstance(length, (list, tuple)) else [length]
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"length must be a positive integer or a non-empty list of them (got {length!r})")
    if len(lengths) > 1 and max(lengths) >= canvas_length:
        raise ValueError(
            f"candidate lengths must leave room for the suffix in one canvas (< {canvas_length}; got {max(lengths)})"
        )
    return sorted(set(lengths))


def _generate_gap(model, tokenizer, prefix_ids, max_tokens, seed, cache, params) -> Iterator[FillResponse]:
    """A gap with no suffix after it: generation from the prefix, as responses of infill."""
    text, r = "", None
    for r in stream_generate(model, tokenizer, prefix_ids, max_tokens, seed, prompt_cache=cache, params=params):
        text += r.text
        if r.finish_reason is None:
            yield _from_generation(r)
    yield _from_generation(r, finished=True, text=text, length=r.generation_tokens)


def _from_generation(r: GenerationResponse, **fields) -> FillResponse:
    """A generation response as infill's (its draft read only when shown)."""
    return FillResponse(
        window=r.canvas_index,
        step=r.step,
        max_denoising_steps=r.max_denoising_steps,
        denoising_steps=r.denoising_steps,
        prompt_tokens=r.prompt_tokens,
        prompt_tps=r.prompt_tps,
        peak_memory=r.peak_memory,
        _parts=None if r.token_ids else (lambda context: [(r.draft, False)]),
        **fields,
    )


def infill(model: Model, tokenizer, prefix: Text, suffix: Text, length: Optional[int] = None, **kwargs) -> str:
    """The text between ``prefix`` and ``suffix`` (see ``stream_infill``)."""
    return last(stream_infill(model, tokenizer, prefix, suffix, length, **kwargs)).text


# -- Editing ------------------------------------------------------------------


class Edit(NamedTuple):
    text: str  # the edited text
    spans: List[Tuple[int, int]]  # where each given span is now, in the order given


def check_spans(text: str, spans, lengths=None) -> List[Tuple[int, int]]:
    """``spans`` as (start, end) character offsets into ``text``; ValueError
    naming the span that is malformed, outside the text or overlapping another."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, (list, tuple)) or not spans:
        raise ValueError("spans must be a non-empty list of (start, end) character offsets")
    checked = []
    for i, span in enumerate(spans):
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise ValueError(f"span {i} must be a pair of integer character offsets (got {reprlib.repr(span)})")
        start, end = span
        if not 0 <= start <= end <= len(text):
            raise ValueError(
                f"span {i} ({start}, {end}) is outside the text of {len(text)} characters "
                "(need 0 <= start <= end <= length)"
            )
        if start == end and (lengths is None or lengths[i] is None):
            raise ValueError(f"span {i} ({start}, {end}) is empty: give its length in tokens to insert text there")
        checked.append((start, end))
    order = sorted(range(len(checked)), key=lambda i: checked[i])
    for a, b in zip(order, order[1:]):
        if checked[b][0] < checked[a][1]:
            raise ValueError(f"spans {a} {checked[a]} and {b} {checked[b]} overlap")
    return checked


def stream_edit(
    model: Model,
    tokenizer,
    text: str,
    spans: Sequence[Tuple[int, int]],
    instruction: Optional[str] = None,
    lengths: Optional[Sequence[Optional[int]]] = None,
    seed: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
    params: Optional[SamplerParams] = None,
    **settings,
) -> Iterator[FillResponse]:
    """Rewrite the character ``spans`` of ``text`` in place, yielding a response per step.

    The text around the spans is held fixed; the spans are renoised and
    denoised. With an ``instruction`` the text is the model's answer to it (a
    user turn through the chat template, then the text, then the end of the
    turn); without, the text follows ``<bos>``. Each span is rewritten in as
    many tokens as it has now, or ``lengths[i]`` (an empty span inserts that
    many), cut at an end-of-sequence token the model writes in it. Text and
    instruction are read as plain text: nothing in them becomes a control
    token. The last response has ``finished`` set, the edited text
    in ``text`` and each span's new (start, end) in ``spans``. ``params`` or
    keyword ``settings`` are the sampler's, as for ``stream_generate``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string (got {type(text).__name__})")
    if lengths is not None:
        if not isinstance(lengths, (list, tuple)) or len(lengths) != len(spans):
            raise ValueError("lengths must give one length (or None) per span")
        for i, n in enumerate(lengths):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"lengths[{i}] must be a positive integer (got {n!r})")
    spans = check_spans(text, spans, lengths)
    sp = sampler_params(model, params, settings)
    order = sorted(range(len(spans)), key=lambda i: spans[i])

    # Text and spans tokenized piece by piece, so every span is whole tokens.
    pieces, kept, at = [], [], 0
    for i in order:
        start, end = spans[i]
        kept.append(text[at:start])
        pieces.append((plain_ids(tokenizer, text[at:start]), False))
        n = lengths[i] if lengths is not None and lengths[i] is not None else len(plain_ids(tokenizer, text[start:end]))
        pieces.append(([0] * n, True))
        at = end
    kept.append(text[at:])
    pieces.append((plain_ids(tokenizer, text[at:]), False))
    if instruction is not None:
        prompt = render(tokenizer, [{"role": "user", "content": instruction}], True, **(chat_template_kwargs or {}))
        pieces.append((end_of_turn(tokenizer), False))
    else:
        bos = getattr(tokenizer, "bos_token_id", None)
        prompt = [bos] if bos is not None else []
        if not prompt and not pieces[0][0]:
            raise ValueError("the text starts with a span and the tokenizer has no <bos> to start from")
    layout = Layout.of(pieces)

    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    _check_context(model, cache, len(prompt), len(layout.tokens), "edit")
    run = _Run(model, tokenizer, sp)
    if prompt:
        run.encode(prompt, cache)
    for event in fill(model, cache, [layout], row_seeds(seed, 1), sp):
        if isinstance(event, FillStep):
            yield run.step(event, [layout])
            continue
        written = event[0]

    # The kept text is returned as given; only the spans are decoded.
    out, new_spans, position = kept[0], [None] * len(spans), 0
    for k, i in enumerate(order):
        position += len(pieces[2 * k][0])
        n = len(pieces[2 * k + 1][0])
        # Control tokens are never document text (the kept text was read as plain text too).
        span_ids = sampler.split_at_eos(written[position : position + n], sp.eos_token_id)[0]
        rewritten = tokenizer.decode(span_ids, skip_special_tokens=True)
        position += n
        new_spans[i] = (len(out), len(out) + len(rewritten))
        out += rewritten + kept[k + 1]
    yield run.result(out, spans=new_spans, length=sum(layout.free), fixed_tokens=layout.fixed_read(model.canvas_length))


def end_of_turn(tokenizer) -> List[int]:
    """The end-of-turn marker as ids (the text of an answer ends with it)."""
    return [tokenizer.convert_tokens_to_ids(END_OF_TURN)]


def edit(
    model: Model,
    tokenizer,
    text: str,
    spans: Sequence[Tuple[int, int]],
    instruction: Optional[str] = None,
    **kwargs,
) -> Edit:
    """``text`` with ``spans`` rewritten, and where they now are (see ``stream_edit``)."""
    result = last(stream_edit(model, tokenizer, text, spans, instruction, **kwargs))
    return Edit(result.text, result.spans)
