"""Batched generation: rows that join and leave a running batch at canvas boundaries.

mlx-lm's ``BatchGenerator`` for block diffusion. A ``Batch`` holds one cache
for its rows (left-padded to one storage index: ``cache.merge``), each row's
PRNG key chain and its progress. ``add`` checks a prompt and queues its row;
``canvas`` runs one canvas for every row:

1. the queued rows join: each prompt is encoded alone into the row's own
   one-row cache (a conversation's, say), which is then merged into the batch;
2. the canvas is denoised (``generate.denoise_canvas``) and committed by
   ``generate.commit_row``, the rule ``generate_step`` commits by;
3. rows whose answer finished (an end of sequence, ``max_tokens``) or that
   were cancelled leave (``PromptCache.filter``); a row that asked for it
   gets its cache back as one row (``PromptCache.extract``), as it would be
   had the row run alone; the others' canvas is encoded for the next one.

A row draws in a batch what it draws alone (up to float rounding): its own
seed's key chain, which waits while the row has stopped and others still
denoise, its own positions (storage index less padding), its own
``max_tokens``. Rows of one batch share one denoising step, hence one
``SamplerParams``: run one batch per distinct setting.
"""

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, List, Optional, Tuple

import mlx.core as mx

from .cache import PromptCache, merge
from .generate import (
    CanvasCommit,
    GenerationResponse,
    RowKeys,
    RowOutput,
    check_context,
    check_max_tokens,
    commit_row,
    denoise_canvas,
    noise_canvas,
)
from .model import Model
from .prompts import as_batch, encode_prompt, row_seeds
from .sampler_params import SamplerParams


@dataclass(eq=False)
class BatchRow:
    """One answer in a ``Batch``: what it asks for and how far it got."""

    ids: List[int]  # the prompt tokens it encodes when it joins
    # Its own one-row cache before it joins; after it finished, with
    # ``keep_cache``, its cache taken back out (the last canvas not encoded,
    # as ``generate_step`` leaves it). None while in the batch.
    cache: Optional[PromptCache]
    seed: int
    max_tokens: int
    keep_cache: bool = False
    tag: Any = None  # the caller's
    output: Optional[RowOutput] = None  # text and statistics, once joined
    canvases: int = 0  # committed so far
    step: int = 0  # the last step it denoised: where its canvas stopped, once it did
    finish_reason: Optional[str] = None
    cancelled: bool = False
    started: float = 0.0  # when it joined

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled


class Batch:
    """Rows sharing one sampler setting and one cache, denoised a canvas at a time."""

    def __init__(self, model: Model, tokenizer, params: SamplerParams, max_rows: int = 8):
        self.model, self.tokenizer, self.params, self.max_rows = model, tokenizer, params, max_rows
        self.rows: List[BatchRow] = []  # in the cache's order
        self.joining: List[BatchRow] = []  # join at the next canvas
        self.cache: Optional[PromptCache] = None
        self.rng = RowKeys([])  # one chain per row, in the rows' order

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    @property
    def full(self) -> bool:
        return len(self) >= self.max_rows

    def add(
        self,
        prompt,
        max_tokens: int,
        seed: Optional[int] = None,
        prompt_cache: Optional[PromptCache] = None,
        keep_cache: bool = False,
        tag: Any = None,
    ) -> BatchRow:
        """Queue a row to join at the next canvas. ``prompt`` is text or ids
        (read as ``stream_generate`` reads a single prompt); ``prompt_cache``
        a one-row cache holding earlier context, continued by this prompt
        (``keep_cache``: given back once the row finished, in ``row.cache``).
        ValueError or TypeError for a prompt the model cannot take."""
        check_max_tokens(max_tokens)
        if self.full:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        cache = prompt_cache if prompt_cache is not None else self.model.make_cache()
        if cache.batch_size != 1 or cache.left_padding is not None:
            raise ValueError("a row's prompt cache must hold one row without padding")
        batch = as_batch(self.tokenizer, prompt, self.model.args.vocab_size, bos=cache.offset == 0)
        if len(batch) != 1:
            raise ValueError(f"a row takes one prompt (got {len(batch)})")
        check_context(self.model, cache.offset + len(batch[0]), max_tokens)
        row = BatchRow(batch[0], cache, row_seeds(seed, 1)[0], max_tokens, keep_cache, tag)
        self.joining.append(row)
        return row

    def cancel(self, row: BatchRow):
        """Drop ``row`` at the next canvas boundary (it yields nothing more);
        when every row is cancelled the canvas stops after its current step."""
        row.cancelled = True

    def canvas(self) -> Iterator[Tuple[BatchRow, GenerationResponse]]:
        """One canvas for every row: ``(row, response)`` per row per step it
        denoised (as a one-row ``stream_generate`` yields them), then one per
        row for the commit. Rows join before it and leave after it."""
        self._join()
        if not self.rows:
            return
        model, params, C = self.model, self.params, self.model.canvas_length
        canvas = noise_canvas(self.rng.next(), C, model.args.vocab_size)
        steps = denoise_canvas(model, self.cache, canvas, params, self.rng, hold_keys=True)
        for event in steps:
            for r, row in enumerate(self.rows):
                if not event.denoised[r]:  # stopped: alone, its canvas would have ended
                    continue
                row.output.forward_passes += 1
                row.step = event.step
                if not row.cancelled:
                    own = replace(event, canvas_index=row.canvases)
                    yield row, row.output.step(own, event.argmax[r : r + 1], *self._speed(row))
            live = [not row.cancelled for row in self.rows]
            if not any(live):
                steps.close()
                self._keep([])
                return
            if all(stopped for stopped, on in zip(event.stopped, live) if on):
                steps.close()  # only cancelled rows still denoise: not worth a step
                break

        argmax = event.argmax.tolist()
        answers = []
        for r, row in enumerate(self.rows):
            if row.cancelled:
                continue
            last = row.canvases == math.ceil(row.max_tokens / C) - 1
            ids, stop_token, finish, valid = commit_row(argmax[r], params, row.output.committed, row.max_tokens, last)
            text = row.output.add(ids, valid, finish)
            commit = CanvasCommit(row.canvases, row.step, [True], [ids], [stop_token], [finish], [valid])
            row.canvases += 1
            row.finish_reason = finish
            answers.append((row, commit, text))

        for r, row in enumerate(self.rows):
            if row.keep_cache and row.finish_reason is not None:
                alone = len(self.rows) == 1 and self.cache.left_padding is None
                row.cache = self.cache if alone else self.cache.extract(r)
        going_on = [r for r, row in enumerate(self.rows) if not row.done]
        self._keep(going_on)
        if going_on:
            # The committed canvas becomes context for the next one; queued
            # now, it runs while the caller handles the commit.
            model.encode(event.argmax[mx.array(going_on)] if len(going_on) < len(argmax) else event.argmax, self.cache)
            mx.async_eval([c.state for c in self.cache])

        for row, commit, text in answers:
            yield row, row.output.commit(commit, 0, text, *self._speed(row))
        # Rows the caller cancelled meanwhile (a stop string cut the answer) leave now.
        if any(row.cancelled for row in self.rows):
            self._keep([r for r, row in enumerate(self.rows) if not row.cancelled])

    def _speed(self, row: BatchRow) -> Tuple[float, int]:
        """The row's generation speed and denoising steps, as it would report them alone."""
        elapsed = max(time.perf_counter() - row.started, 1e-9)
        return row.output.committed / elapsed, row.output.forward_passes

    def _join(self):
        joining, self.joining = [r for r in self.joining if not r.cancelled], []
        if not joining:
            return
        for row in joining:
            tic = time.perf_counter()
            prompt_tokens = encode_prompt(self.model, [row.ids], row.cache)
            prompt_tps = prompt_tokens / max(time.perf_counter() - tic, 1e-9)
            row.output = RowOutput(self.tokenizer, self.params, prompt_tokens, prompt_tps)
            row.started = time.perf_counter()
        self.cache = merge(([self.cache] if self.rows else []) + [row.cache for row in joining])
        for row in joining:
            row.cache = None  # the batch's now
        self.rng.keys = self.rng.keys + [mx.random.key(row.seed) for row in joining]
        self.rows += joining

    def _keep(self, rows: List[int]):
        """Keep only ``rows`` (indices into ``self.rows``) in the batch."""
        if len(rows) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in rows]
        self.rng.keys = [self.rng.keys[r] for r in rows]
        if not rows:
            self.cache = None
        else:
            self.cache.filter(rows)
