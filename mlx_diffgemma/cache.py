"""The encoder's KV cache, which the decoder reads but never writes.

Full-attention layers keep every encoded token. Sliding-window layers keep only
the last ``window - 1`` tokens: that is all a later query can see (it attends to
itself and the ``window - 1`` tokens before it), and it is exactly the set the
reference decoder attends to over the cache.

Keys and values are stored in temporal order, shape [B, kv_heads, T, head_dim].
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
        # Absolute position of the next token, i.e. how many tokens were encoded.
        self.offset = 0

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def start(self) -> int:
        """Absolute position of the first stored token."""
        return self.offset - self.length

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
        return other

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
        self.left_padding: Optional[mx.array] = None

    @property
    def offset(self) -> int:
        return self[0].offset

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
