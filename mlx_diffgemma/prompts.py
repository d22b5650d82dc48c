"""Prompts as the generators take them: text or ids to id rows, seeds per row,
and the prompt encoded into the cache."""

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import distributed, sampler
from .cache import PromptCache
from .model import Model

# Prompts are encoded in chunks of this many tokens, as mlx-lm prefills.
PREFILL_STEP = 2048

Prompt = Union[str, Sequence[int]]

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


def as_batch(tokenizer, prompt, vocab_size: int, what: str = "prompt", bos: bool = True) -> List[List[int]]:
    """A prompt (text or ids) or a list of prompts -> list of id lists.

    Text is read as ``text_ids`` reads it (``bos``: after ``<bos>``); ids are
    used as given. ``what`` names the argument in errors."""
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and all_ids(prompt)):
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
        elif isinstance(p, (list, tuple)) and all_ids(p):
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


def all_ids(values) -> bool:
    """Whether ``values`` are all token ids (integers, not booleans)."""
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values)


def initial_canvases(initial_canvas, batch: int, canvas_length: int, vocab: int):
    """``initial_canvas`` ([C] or [B, C] ids) as the first canvas of ``batch`` rows, checked; None stays None."""
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


def encode_prompt(
    model: Model, batch: List[List[int]], cache: PromptCache, images: Optional[List[Optional[mx.array]]] = None
) -> int:
    """Left-pad the rows to one length and encode them; returns the padded length.

    ``images`` holds per row the soft tokens of its images (``image_prompts.
    image_features``), which take the place of its image tokens."""
    length = max(len(p) for p in batch)
    pad = model.args.pad_token_id
    padding = [length - len(p) for p in batch]
    rows = np.array([[pad] * n + p for n, p in zip(padding, batch)])
    ids = mx.array(rows)
    left_padding = padding if any(padding) else None
    if left_padding is not None and cache.offset:
        raise ValueError("a cached prompt can only be continued by rows of equal length")
    is_image = None
    if images is not None and any(f is not None for f in images):
        is_image = rows == model.args.image_token_id
        used = [0] * len(batch)
    for start, end in _chunks(length, is_image):
        features = None
        if is_image is not None:
            parts = []
            for r, f in enumerate(images):
                n = int(is_image[r, start:end].sum())
                if n:
                    parts.append(f[used[r] : used[r] + n])
                    used[r] += n
            features = mx.concatenate(parts, axis=0) if parts else None
        if features is None:
            model.encode(ids[:, start:end], cache, left_padding=left_padding)
        else:
            model.encode(ids[:, start:end], cache, left_padding=left_padding, image_features=features)
        left_padding = None
        mx.eval([c.state for c in cache])
    return length


def _chunks(length: int, is_image: Optional[np.ndarray]) -> List[Tuple[int, int]]:
    """[start, end) of each PREFILL_STEP chunk, each end moved past any image
    it would cut: an image's tokens attend to each other, so they are encoded
    together."""
    bounds, start = [], 0
    while start < length:
        end = min(start + PREFILL_STEP, length)
        if is_image is not None:
            while end < length and (is_image[:, end - 1] & is_image[:, end]).any():
                end += 1
        bounds.append((start, end))
        start = end
    return bounds


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
        seed = distributed.random_seed()
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        if len(seeds) != batch:
            raise ValueError(f"seed lists {len(seeds)} seeds for {batch} prompts")
        return seeds
    seed = check_seed(seed)
    return [(seed + r) % SEED_LIMIT for r in range(batch)]
