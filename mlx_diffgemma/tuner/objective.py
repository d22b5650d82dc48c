"""The block-diffusion training objective.

For each example (as Google's Gemma repository and NVIDIA NeMo describe it for
this model):

- the completion is cut into canvas-length blocks right after the prompt; the
  last block is what the sampler commits for a finished answer: the text up to
  its first end-of-sequence token, that token, then padding;
- the encoder reads prompt + clean blocks causally, with an autoregressive
  cross-entropy on that clean sequence (``ar_weight``, 1 by default);
- one block is chosen uniformly and corrupted with uniform-state noise:
  t ~ U(1e-4, 1), each position replaced with probability t by a token drawn
  uniformly from the whole vocabulary (alpha(t) = 1 - t; there is no mask token);
- the decoder denoises it, attending to the encoder's cache up to the block
  (the prompt and earlier blocks), with an unweighted cross-entropy over every
  position of the block, corrupted or not;
- self-conditioning, per example with probability 0.5: a first decoder pass
  with no signal, under stop-gradient, gives logits whose softmax conditions a
  second pass, as the sampler feeds a step's probabilities to the next; other
  examples get the zero signal of a canvas' first step.

Not published, chosen here (docs/training.md): the first pass's logits are fed
at temperature 1 (the sampler feeds them divided by its 0.4-0.8 schedule); the
two losses are each a mean over their own tokens and then added.

All randomness is drawn with numpy when a batch is made, so the loss is a plain
function of the batch's arrays and a fixed seed gives a fixed batch.
"""

from dataclasses import dataclass
from typing import List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import LayerCache, PromptCache
from .datasets import Example

T_EPSILON = 1e-4  # the noise level is drawn from U(T_EPSILON, 1)


def completion_blocks(completion: Sequence[int], canvas_length: int, eos_ids: Sequence[int], pad_id: int) -> np.ndarray:
    """The completion as [blocks, canvas_length]: text, one EOS, then padding.

    Tokens after the first EOS are dropped (the sampler drops them too); a
    completion with no EOS gets ``eos_ids[0]``.
    """
    tokens = list(completion)
    ends = [i for i, t in enumerate(tokens) if t in set(eos_ids)]
    tokens = tokens[: ends[0] + 1] if ends else tokens + [eos_ids[0]]
    n = -(-len(tokens) // canvas_length)
    blocks = np.full((n, canvas_length), pad_id, dtype=np.int32)
    blocks.reshape(-1)[: len(tokens)] = tokens
    return blocks


def corrupt(block: np.ndarray, t: float, vocab_size: int, rng: np.random.Generator):
    """Uniform-state noise at level ``t``: the noisy block and which positions were replaced."""
    replaced = rng.random(block.shape) < t
    noise = rng.integers(0, vocab_size, size=block.shape, dtype=np.int32)
    return np.where(replaced, noise, block).astype(np.int32), replaced


@dataclass
class Batch:
    """One batch: the clean sequences right-padded to one length, and per row
    the chosen block (where it starts, clean and corrupted)."""

    tokens: mx.array  # [B, T] prompt + blocks
    starts: mx.array  # [B] position of each row's chosen block
    ar_mask: mx.array  # [B, T - 1]: which next-token targets count
    canvas: mx.array  # [B, C] the corrupted blocks
    targets: mx.array  # [B, C] the clean blocks
    self_conditioning: mx.array  # [B] bool: a first pass feeds the second
    any_self_conditioning: bool
    noise_levels: np.ndarray  # [B] the t each block was corrupted at
    ntokens: int  # real tokens (prompt + blocks) in the batch


@dataclass
class ObjectiveArgs:
    canvas_length: int
    vocab_size: int
    eos_ids: Sequence[int]
    pad_id: int
    mask_prompt: bool = False
    self_conditioning_rate: float = 0.5


def example_length(example: Example, canvas_length: int) -> int:
    """Tokens the encoder reads for ``example``: prompt + whole blocks."""
    n = -(-(len(example.completion) + 1) // canvas_length)
    return len(example.prompt) + n * canvas_length


def make_batch(examples: List[Example], args: ObjectiveArgs, rng: np.random.Generator) -> Batch:
    C = args.canvas_length
    rows, levels = [], []
    for ex in examples:
        blocks = completion_blocks(ex.completion, C, args.eos_ids, args.pad_id)
        j = int(rng.integers(0, len(blocks)))
        t = rng.uniform(T_EPSILON, 1.0)
        canvas, _ = corrupt(blocks[j], t, args.vocab_size, rng)
        rows.append((ex.prompt, blocks, j, canvas))
        levels.append(t)
    sc = rng.random(len(examples)) < args.self_conditioning_rate

    length = max(len(p) + b.size for p, b, _, _ in rows)
    tokens = np.full((len(rows), length), args.pad_id, dtype=np.int32)
    ar_mask = np.zeros((len(rows), length - 1), dtype=np.float32)
    ntokens = 0
    for r, (prompt, blocks, _, _) in enumerate(rows):
        seq = np.concatenate([np.asarray(prompt, np.int32), blocks.reshape(-1)])
        tokens[r, : len(seq)] = seq
        ntokens += len(seq)
        # Targets at sequence indices 1 .. the EOS (padding after it is not text).
        text_end = len(prompt) + int(np.flatnonzero(np.isin(blocks.reshape(-1), args.eos_ids))[0]) + 1
        first = len(prompt) if args.mask_prompt else 1
        ar_mask[r, first - 1 : text_end - 1] = 1.0
    return Batch(
        tokens=mx.array(tokens),
        starts=mx.array([len(p) + j * C for p, _, j, _ in rows]),
        ar_mask=mx.array(ar_mask),
        canvas=mx.array(np.stack([c for *_, c in rows])),
        targets=mx.array(np.stack([b[j] for _, b, j, _ in rows])),
        self_conditioning=mx.array(sc),
        any_self_conditioning=bool(sc.any()),
        noise_levels=np.array(levels),
        ntokens=ntokens,
    )


class _LayerContext:
    """One layer's encoder keys and values over the whole clean sequence."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset
        self.positions = offset  # each row's block starts at its own position

    def extend(self, keys: mx.array, values: mx.array):
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


class BlockContext(list):
    """The encoder's cache as each row's decoder sees it: up to the row's block.

    One causal encoder pass gives every position's keys and values; a key at
    a position before a row's block is the same whether or not the encoder
    read the tokens after it, so the decoder of row ``b`` attends to the keys
    below ``starts[b]`` (sliding layers: the last ``window - 1`` of them, as
    the generation cache keeps) plus the canvas, at positions from
    ``starts[b]`` on. The same attention as generation's, for every row at
    once, with no padding to line the blocks up.
    """

    def __init__(self, cache: PromptCache, starts: mx.array, sliding: List[bool], window: int):
        super().__init__(_LayerContext(c.keys, c.values, starts) for c in cache)
        self.offset = starts
        self.left_padding = None
        self._sliding = sliding
        self._window = window

    def key_masks(self, length: int):
        keys = mx.arange(self[0].keys.shape[2])[None]
        starts = self.offset[:, None]
        before = keys < starts
        canvas = mx.ones((starts.shape[0], length), dtype=mx.bool_)
        masks = {}
        for sliding in set(self._sliding):
            seen = before & (keys >= starts - (self._window - 1)) if sliding else before
            masks[sliding] = mx.concatenate([seen, canvas], axis=1)[:, None, None, :]
        return masks


def encoder_cache(model) -> PromptCache:
    """A cache that keeps every layer's keys whole (training needs them all)."""
    return PromptCache([LayerCache(None) for _ in model.layers])


def decoder_logits(model, canvas: mx.array, cache: PromptCache, self_conditioning: mx.array) -> mx.array:
    """The decoder's logits for ``canvas``, self-conditioned where asked.

    Rows with ``self_conditioning`` get the softmax of a first pass (no signal,
    no gradient); the others a zero signal, which the self-conditioning MLP
    maps to exactly zero, as a canvas' first step gets.
    """
    if self_conditioning is None:
        return model.denoise(canvas, cache)
    first = mx.stop_gradient(model.denoise(canvas, cache))
    probs = mx.softmax(first, axis=-1) * self_conditioning[:, None, None]
    return model.denoise(canvas, cache, self_conditioning_probs=probs)


def losses(model, batch: Batch, autoregressive: bool = True):
    """(decoder cross-entropy, autoregressive cross-entropy or None), each a
    mean over its own tokens."""
    cache = encoder_cache(model)
    hidden = model.encode(batch.tokens, cache)
    context = BlockContext(cache, batch.starts, model.sliding_layers, model.args.sliding_window)

    signal = batch.self_conditioning if batch.any_self_conditioning else None
    logits = decoder_logits(model, batch.canvas, context, signal)
    denoise_loss = nn.losses.cross_entropy(logits, batch.targets).mean()
    if not autoregressive:
        return denoise_loss, None

    ce = nn.losses.cross_entropy(model.logits(hidden[:, :-1]), batch.tokens[:, 1:])
    ar_loss = (ce * batch.ar_mask).sum() / mx.maximum(batch.ar_mask.sum(), 1)
    return denoise_loss, ar_loss


def loss(model, batch: Batch, ar_weight: float = 1.0):
    """The training loss and the batch's token count (mlx-lm's loss signature)."""
    denoise_loss, ar_loss = losses(model, batch, autoregressive=bool(ar_weight))
    total = denoise_loss + ar_weight * ar_loss if ar_weight else denoise_loss
    return total, batch.ntokens
