"""The encoder's KV cache, which the decoder reads but never writes.

Full-attention layers keep every encoded token. Sliding-window layers keep only
the last ``window - 1`` tokens: that is all a later query can see (it attends to
itself and the ``window - 1`` tokens before it), and it is exactly the set the
reference decoder attends to over the cache.

Keys and values are stored in temporal order, shape [B, kv_heads, T, head_dim].
A batch's rows share one storage index: a shorter row is left-padded (its
``left_padding`` leading places hold no token and are masked), so a row's
position is its storage index minus its padding. Rows can be merged into a
batch, filtered out of it, and taken back out as a one-row cache, at canvas
boundaries (``merge``, ``PromptCache.filter``, ``PromptCache.extract``: the
batch engine's, as mlx-lm's BatchKVCache does for tokens). Every layer holds
the last ``min(offset, keep)`` places, whatever the rows: merging and
filtering keep that rule.
"""

from typing import Dict, List, Optional, Tuple

import mlx.core as mx


class LayerCache:
    """Keys and values of one layer.

    ``keep`` bounds how many tokens are kept (None: all of them).
    """

    def __init__(self, keep: Optional[int] = None):
        self.keep = keep
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        # Storage index of the next token: how many places were encoded (pads too).
        self.offset = 0
        # Per row [B], the pad places before the row's first token (None: no
        # padding). The PromptCache sets it on all its layers.
        self.left_padding: Optional[mx.array] = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def start(self) -> int:
        """Storage index of the first stored token."""
        return self.offset - self.length

    @property
    def positions(self):
        """The position of the next token, per row [B] when rows are padded
        (the storage index less the row's padding), else one int: what the
        rotary embedding turns the new tokens by."""
        if self.left_padding is None:
            return self.offset
        return self.offset - self.left_padding

    def extend(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Stored keys/values followed by ``keys``/``values``; the cache is unchanged."""
        if self.keys is None:
            return keys, values
        return (
            mx.concatenate([self.keys, keys], axis=2),
            mx.concatenate([self.values, values], axis=2),
        )

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store ``keys``/``values`` and return everything the new queries attend to."""
        all_keys, all_values = self.extend(keys, values)
        self.offset += keys.shape[2]
        if self.keep is not None and all_keys.shape[2] > self.keep:
            self.keys = all_keys[:, :, -self.keep :]
            self.values = all_values[:, :, -self.keep :]
        else:
            self.keys, self.values = all_keys, all_values
        return all_keys, all_values

    @property
    def state(self):
        return self.keys, self.values

    def repeat(self, batch: int) -> "LayerCache":
        """This one-row cache as ``batch`` identical rows."""
        other = self.copy()
        if self.keys is not None:
            other.keys = mx.repeat(self.keys, batch, axis=0)
            other.values = mx.repeat(self.values, batch, axis=0)
        return other

    def copy(self) -> "LayerCache":
        """This cache as it is now; appends to either leave the other unchanged."""
        other = LayerCache(self.keep)
        other.keys, other.values, other.offset = self.keys, self.values, self.offset
        other.left_padding = self.left_padding
        return other

    def _places(self, rows: Optional[mx.array], first: int, length: int) -> Tuple[mx.array, mx.array]:
        """Keys and values of ``rows`` (all: None) for the ``length`` places
        from storage index ``first``; places before the stored ones are zeros
        (padding, masked)."""
        keys, values = self.keys, self.values
        if rows is not None:
            keys, values = keys[rows], values[rows]
        missing = self.start - first
        if missing > 0:
            width = [(0, 0), (0, 0), (missing, 0), (0, 0)]
            keys, values = mx.pad(keys, width), mx.pad(values, width)
        else:
            keys, values = keys[:, :, -missing:], values[:, :, -missing:]
        return keys[:, :, :length], values[:, :, :length]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class PromptCache(list):
    """One ``LayerCache`` per layer, plus the batch's left padding.

    ``left_padding[b]`` is the number of pad tokens at the start of row ``b``:
    keys at positions below it are hidden from every query.
    """

    def __init__(self, layers: List[LayerCache]):
        super().__init__(layers)
        self.left_padding = None

    @property
    def left_padding(self) -> Optional[mx.array]:
        return self[0].left_padding if self else None

    @left_padding.setter
    def left_padding(self, value: Optional[mx.array]):
        # Each layer rotates its tokens by the rows' own positions.
        for c in self:
            c.left_padding = value

    @property
    def offset(self) -> int:
        return self[0].offset

    @property
    def batch_size(self) -> int:
        keys = self[0].keys
        return 1 if keys is None else keys.shape[0]

    def row_lengths(self) -> List[int]:
        """Tokens per row (its padding excluded)."""
        if self.left_padding is None:
            return [self.offset] * self.batch_size
        return [self.offset - p for p in self.left_padding.tolist()]

    def filter(self, rows: List[int]):
        """Keep only ``rows`` (in that order), in place; the padding every
        kept row has in common is dropped (mlx-lm's BatchKVCache.filter)."""
        index = mx.array(rows)
        padding = None if self.left_padding is None else self.left_padding[index]
        drop = 0 if padding is None else min(padding.tolist())
        for c in self:
            if c.keys is not None:
                first = max(c.start, drop)
                c.keys, c.values = c._places(index, first, c.offset - first)
            c.offset -= drop
        if padding is not None and drop:
            padding = padding - drop
        self.left_padding = padding if padding is not None and any(padding.tolist()) else None

    def extract(self, row: int) -> "PromptCache":
        """Row ``row`` as a one-row cache without padding: what the row's cache
        would be had it been encoded alone (copied, so the batch's arrays can go)."""
        length = self.row_lengths()[row]
        index = mx.array([row])
        layers = []
        for c in self:
            one = LayerCache(c.keep)
            one.offset = length
            kept = min(length, c.length)
            if kept:
                keys, values = c._places(index, c.offset - kept, kept)
                one.keys, one.values = mx.contiguous(keys), mx.contiguous(values)
            layers.append(one)
        return PromptCache(layers)

    def key_masks(self, length: int) -> Optional[Dict[bool, mx.array]]:
        """The masks for ``length`` new queries, by layer kind (sliding or
        not), where the cache has its own rule; None: the model builds them
        from the positions (a training context returns each row's)."""
        return None

    def copy(self) -> "PromptCache":
        """This cache as it is now (its arrays shared, never written in place)."""
        other = PromptCache([c.copy() for c in self])
        other.left_padding = self.left_padding
        return other

    def repeat(self, batch: int) -> "PromptCache":
        """A one-row cache as ``batch`` identical rows: a prompt encoded once
        for rows that go on differently (infilling's candidate lengths)."""
        if self.left_padding is not None or (self[0].keys is not None and self[0].keys.shape[0] != 1):
            raise ValueError("only a one-row cache without padding can be repeated")
        return PromptCache([c.repeat(batch) for c in self])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)


def merge(caches: List[PromptCache]) -> PromptCache:
    """The rows of ``caches`` (batches or single rows) as one batch, in order.

    Each is right-aligned at the longest's offset and the places before its
    tokens become padding (mlx-lm's BatchKVCache.merge): every row keeps its
    own positions, and each layer the last ``min(offset, keep)`` places.
    """
    if len(caches) == 1:
        return caches[0]
    offset = max(c.offset for c in caches)
    padding = []
    for cache in caches:
        shift = offset - cache.offset
        own = [0] * cache.batch_size if cache.left_padding is None else cache.left_padding.tolist()
        padding += [p + shift for p in own]
    layers = []
    for i, first in enumerate(caches[0]):
        merged = LayerCache(first.keep)
        merged.offset = offset
        # The longest row's places; another's older ones are padding.
        length = max(c[i].length for c in caches)
        parts = [c[i]._places(None, c[i].offset - length, length) for c in caches]
        merged.keys = mx.concatenate([k for k, _ in parts])
        merged.values = mx.concatenate([v for _, v in parts])
        layers.append(merged)
    cache = PromptCache(layers)
    cache.left_padding = mx.array(padding) if any(padding) else None
    return cache
