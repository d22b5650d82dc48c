"""DiffusionGemma's text model: one stack of Gemma 4 MoE layers run two ways.

``encode`` runs the layers causally over prompt (or committed canvas) tokens and
appends their keys and values to the cache. ``denoise`` runs the same layers
bidirectionally over a canvas, attending to the cache plus the canvas, and
leaves the cache untouched. The weights exist once.
"""

import math
from functools import cached_property, partial
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

from . import cpu_experts
from .cache import LayerCache, PromptCache
from .config import ModelArgs
from .vision import VisionEmbedder, VisionTower


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class GeGLU(nn.Module):
    """SwitchGLU calls its activation as ``activation(up, gate)``."""

    def __call__(self, up: mx.array, gate: mx.array) -> mx.array:
        return geglu(gate, up)


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


# Where MLX has no fused attention kernel for a call (its CPU backend; on
# Metal, head dims its kernels lack, such as the released model's 512-wide
# full-attention heads), scaled_dot_product_attention materialises the scores
# [B, heads, queries, keys]: 4.3 GB in float32 for a 2048-token chunk against
# 32,768 keys at 16 heads. Queries therefore go in blocks whose scores stay
# under this many bytes, so a long prompt costs its cache, not chunk x cache.
# A block's work stays large (at 32k keys, 64 queries of 16 heads); a denoising
# step over a short cache is one block, the call it always was.
ATTENTION_BLOCK_BYTES = 128 * 2**20


def attention(queries: mx.array, keys: mx.array, values: mx.array, mask: Optional[mx.array]) -> mx.array:
    """Attention of [B, heads, L, D] queries, in blocks of queries as
    ``ATTENTION_BLOCK_BYTES`` allows, each with its rows of ``mask`` [..., L or 1, K]."""
    B, heads, L, _ = queries.shape
    # 4 bytes a score whatever the dtype: float32 is the widest.
    rows = max(1, ATTENTION_BLOCK_BYTES // (B * heads * keys.shape[2] * 4))
    # q/k norms take the place of the 1/sqrt(d) scale.
    if rows >= L:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    out = []
    for i in range(0, L, rows):
        block = mask if mask is None or mask.shape[-2] == 1 else mask[..., i : i + rows, :]
        q = queries[:, :, i : i + rows]
        out.append(mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=block))
        # Lazily, the host would allocate many blocks' scores before the first
        # is computed (measured: some 20 blocks in flight on the CPU); one at a
        # time, each block's scores are freed before the next one's are made.
        # (Gradients allow this eval; mx.compile would not: the model is not compiled.)
        mx.eval(out[-1])
    return mx.concatenate(out, axis=2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.layer_kv_heads[layer_idx]
        self.head_dim = args.layer_head_dims[layer_idx]
        dims = args.hidden_size

        self.q_proj = nn.Linear(dims, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=False)
        # Full-attention layers have no value projection: values are the raw
        # key projection, normalised without scale and not rotated.
        if self.is_sliding:
            self.v_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dims, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(args.rms_norm_eps)
        # Tensor parallelism (distributed.shard): this process holds some of
        # the heads, and the partial outputs are summed over ``group``.
        self.group: Optional[mx.distributed.Group] = None

        rope = args.rope_parameters[args.layer_types[layer_idx]]
        self.rope = initialize_rope(
            dims=self.head_dim,
            base=rope["rope_theta"],
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(
        self, x: mx.array, cache: LayerCache, mask: Optional[mx.array], encoding: bool, rows: Optional[mx.array] = None
    ) -> mx.array:
        """Attention of ``x``'s positions to the cache and to ``x``; with
        ``rows`` [B, A] (canvas positions), only those positions' outputs,
        every position still serving as a key."""
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1))
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1) if self.is_sliding else keys
        keys = self.k_norm(keys)
        values = self.v_norm(values)

        # Each row at its own positions: rows of a batch may be padded differently.
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset=cache.positions)
        keys = self.rope(keys.transpose(0, 2, 1, 3), offset=cache.positions)
        values = values.transpose(0, 2, 1, 3)

        if encoding:
            keys, values = cache.append(keys, values)
        else:
            keys, values = cache.extend(keys, values)

        if rows is not None:
            # Rotated at their own positions, then gathered: the rows' queries.
            queries = mx.take_along_axis(queries, rows[:, None, :, None], axis=2)
            if mask is not None and mask.shape[-2] > 1:
                mask = mx.broadcast_to(mask, (B,) + mask.shape[1:])
                mask = mx.take_along_axis(mask, rows[:, None, :, None], axis=2)
            L = rows.shape[1]
        out = attention(queries, keys, values, mask)
        out = self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.root_size = args.hidden_size**-0.5

    def __call__(self, x: mx.array):
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root_size
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        # Indices carry no gradient (training would otherwise ask for one).
        top_k = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, top_k, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return top_k, weights * self.per_expert_scale[top_k]


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            activation=GeGLU(),
            bias=False,
        )

    def __call__(self, x: mx.array, top_k: mx.array, weights: mx.array) -> mx.array:
        y = cpu_experts.switch_glu(self.switch_glu, x, top_k)
        return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)


class Layer(nn.Module):
    """Attention, then a dense GeGLU MLP and a MoE block side by side."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(dims, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        # The checkpoint stores the encoder's and the decoder's scalar apart.
        self.layer_scalar = mx.ones((1,))
        self.encoder_layer_scalar = mx.ones((1,))
        # Tensor parallelism: this process holds part of the MLP's and each
        # expert's width (distributed.shard); partial sums meet over ``group``.
        self.group: Optional[mx.distributed.Group] = None

    def __call__(
        self, x: mx.array, cache: LayerCache, mask: Optional[mx.array], encoding: bool, rows: Optional[mx.array] = None
    ) -> mx.array:
        """The layer's output for ``x``; with ``rows`` [B, A], for those positions only."""
        attended = self.self_attn(self.input_layernorm(x), cache, mask, encoding, rows)
        h = (x if rows is None else gather_rows(x, rows)) + self.post_attention_layernorm(attended)
        out = h + self.feed_forward(h)
        return out * (self.encoder_layer_scalar if encoding else self.layer_scalar)

    def feed_forward(self, h: mx.array) -> mx.array:
        """The dense MLP and the experts side by side (no cache: training may
        recompute it in the backward pass to save memory)."""
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        # The router reads the raw residual, not a normed one.
        top_k, weights = self.router(h)
        sparse = self.experts(self.pre_feedforward_layernorm_2(h), top_k, weights)
        if self.group is not None:
            # Both partial sums in one exchange, before the norms they feed.
            both = mx.distributed.all_sum(mx.concatenate([dense, sparse], axis=-1), group=self.group)
            dense, sparse = mx.split(both, 2, axis=-1)
        dense = self.post_feedforward_layernorm_1(dense)
        sparse = self.post_feedforward_layernorm_2(sparse)
        return self.post_feedforward_layernorm(dense + sparse)


class SelfConditioning(MLP):
    """Mixes the previous step's soft prediction into the canvas embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.hidden_size, args.intermediate_size)
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_norm = RMSNormNoScale(args.rms_norm_eps)

    def __call__(self, embeds: mx.array, soft: Optional[mx.array]) -> mx.array:
        # With no signal (a canvas' first step) the MLP of zeros is exactly zero.
        if soft is not None:
            embeds = embeds + super().__call__(self.pre_norm(soft))
        return self.post_norm(embeds)


def gather_rows(x: mx.array, rows: mx.array) -> mx.array:
    """``x`` [B, C, ...] at positions ``rows`` [B, A]: [B, A, ...]."""
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return mx.take_along_axis(x, index, axis=1)


def scatter_rows(x: mx.array, rows: mx.array, values: mx.array) -> mx.array:
    """``x`` [B, C, ...] with positions ``rows`` [B, A] set to ``values`` [B, A, ...]."""
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return mx.put_along_axis(x, index, values.astype(x.dtype), axis=1)


class DecoderStates(NamedTuple):
    """What a decoder pass leaves for an approximate one (``Model.denoise_rows``):
    each layer's input [B, C, D] and the logits [B, C, V], for every canvas position."""

    inputs: List[mx.array]
    logits: mx.array


def _key_mask(
    queries: mx.array,
    keys: mx.array,
    causal: bool,
    window: Optional[int],
    left_padding: Optional[mx.array],
) -> Optional[mx.array]:
    """Boolean [B or 1, 1, L, K] mask from absolute query and key positions."""
    q, k = queries[:, None], keys[None]
    mask = None
    if causal:
        mask = k <= q
        if window is not None:
            mask = mask & (k > q - window)
    if left_padding is not None:
        visible = k[None] >= left_padding[:, None, None]
        # A pad query sees itself, so its row is never empty (an empty row
        # would turn into NaN and leak through later layers' values).
        visible = visible | (k == q)[None]
        mask = visible if mask is None else (mask[None] & visible)
        mask = mask[:, None]
    return mask


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        if args.vision is not None:
            self.vision_tower = VisionTower(args.vision)
            self.embed_vision = VisionEmbedder(args.vision, args.hidden_size)
        # What ``utils.load`` knows of the checkpoint beside its weights.
        self.generation_config: Dict[str, Any] = {}  # its generation_config.json
        self.path: Optional[str] = None  # where it was read from: errors about its weights name it
        self.adapter_path: Optional[str] = None  # the LoRA adapters loaded on it, if any
        self.image_processor = None  # its images.ImageProcessor, with a vision tower
        # Pipeline parallelism (distributed.pipeline): ``layers`` are then this
        # process's stage of the stack, which reads its input from the stage
        # before and hands its output to the next.
        self.stage = None
        # Tensor parallelism (distributed.shard): the group the layers' heads and widths are split over.
        self.tensor_group = None

    @property
    def canvas_length(self) -> int:
        return self.args.canvas_length

    @cached_property  # read by every forward pass; kept out of the module's parameter tree
    def sliding_layers(self) -> Tuple[bool, ...]:
        """Per layer (of this process's stage, if pipelined): whether it attends
        to a sliding window (else to the whole context)."""
        return tuple(layer.self_attn.is_sliding for layer in self.layers)

    def make_cache(self) -> PromptCache:
        keep = self.args.sliding_window - 1
        return PromptCache([LayerCache(keep if s else None) for s in self.sliding_layers])

    def _embed_scale(self, dtype) -> mx.array:
        # The reference casts sqrt(hidden) to the weight dtype (53.0 in bf16).
        return mx.array(math.sqrt(self.args.hidden_size), dtype=dtype)

    def _embed(self, ids: mx.array) -> mx.array:
        h = self.embed_tokens(ids)
        return h * self._embed_scale(h.dtype)

    def _masks(self, cache: PromptCache, length: int, causal: bool, blocks: Optional[mx.array] = None):
        """One mask per layer type, built once per call. ``blocks`` [B, L]
        numbers the images among the new tokens (-1 elsewhere): tokens of
        one image also see each other, in every layer (the reference's rule)."""
        masks = cache.key_masks(length)
        if masks is not None:  # a training context, with its own rule per row
            return masks
        positions = mx.arange(cache.offset, cache.offset + length)
        masks = {}
        for sliding in (True, False):
            if sliding not in self.sliding_layers:
                continue
            c = cache[self.sliding_layers.index(sliding)]
            keys = mx.arange(c.start, cache.offset + length)
            window = self.args.sliding_window if sliding else None
            masks[sliding] = _key_mask(positions, keys, causal, window, cache.left_padding)
            if blocks is not None:
                earlier = mx.full((blocks.shape[0], keys.shape[0] - length), -1, dtype=blocks.dtype)
                key_blocks = mx.concatenate([earlier, blocks], axis=1)
                same = (blocks[:, :, None] == key_blocks[:, None, :]) & (blocks[:, :, None] >= 0)
                masks[sliding] = masks[sliding] | same[:, None]
        return masks

    def _run_layers(self, h: mx.array, cache: PromptCache, encoding: bool, blocks=None) -> mx.array:
        masks = self._masks(cache, h.shape[1], causal=encoding, blocks=blocks)
        h = self._stage_input(h)
        for layer, c, sliding in zip(self.layers, cache, self.sliding_layers):
            h = layer(h, c, masks[sliding], encoding)
        return self.norm(self._stage_output(h, cache if encoding else None))

    def _stage_input(self, h: mx.array) -> mx.array:
        """A pipeline stage after the first reads its input from the one before."""
        stage = self.stage
        if stage is None or stage.rank == 0:
            return h
        return mx.distributed.recv_like(h, stage.rank - 1, group=stage.group)

    def _stage_output(self, h: mx.array, cache: Optional[PromptCache] = None) -> mx.array:
        """The last stage's output, on every stage: each process then samples
        the same tokens from the same logits. A stage before the last hands
        ``h`` on; ``cache`` (when encoding) is made to depend on that send, so
        evaluating the cache alone, as generation does, still sends it."""
        stage = self.stage
        if stage is None:
            return h
        if stage.rank < stage.size - 1:
            h = mx.distributed.send(h, stage.rank + 1, group=stage.group)
            for c in cache or ():
                c.keys, c.values = mx.depends([c.keys, c.values], [h])
        return mx.distributed.all_gather(h, group=stage.group)[-h.shape[0] :]

    def encode(
        self,
        input_ids: mx.array,
        cache: PromptCache,
        left_padding=None,
        image_features: Optional[mx.array] = None,
    ) -> mx.array:
        """Append the tokens' keys and values to ``cache``; return final hidden states.

        ``left_padding`` (per row pad count) is given with the first chunk of a
        left-padded batch and then remembered by the cache. ``image_features``
        [N, hidden] (``encode_image``'s, in the order the images appear, row
        by row) take the place of the N image tokens among ``input_ids``; an
        image's tokens must all be in this call.
        """
        if left_padding is not None:
            cache.left_padding = mx.array(left_padding)
        h = self._embed(input_ids)
        blocks = None
        if image_features is not None:
            h, blocks = self._place_images(input_ids, h, image_features)
        return self._run_layers(h, cache, encoding=True, blocks=blocks)

    def encode_image(self, pixels: mx.array, positions: mx.array, grid: Tuple[int, int]) -> mx.array:
        """One image's patches (``images.ProcessedImage``) -> its soft tokens
        in the text model's embedding space [P / 9, hidden]."""
        if self.args.vision is not None and self.stage is not None and self.stage.rank > 0:
            # A later pipeline stage reads the stage before's output, not these
            # features (it keeps no tower): only their number matters here.
            k = self.args.vision.pooling_kernel_size
            return mx.zeros((pixels.shape[0] // k**2, self.args.hidden_size), self.dtype)
        if self.args.vision is None or "vision_tower" not in self:
            raise ValueError(f"{self.path or 'this model'} has no vision tower: it reads text only")
        return self.embed_vision(self.vision_tower(pixels, positions, grid))

    def _place_images(self, input_ids: mx.array, h: mx.array, features: mx.array):
        """``h`` with the image tokens' embeddings replaced by ``features``, and
        the images' block numbers for the mask (None unless the model's image
        tokens attend both ways)."""
        ids = np.array(input_ids)
        is_image = ids == self.args.image_token_id
        rows, cols = np.nonzero(is_image)
        if len(rows) != features.shape[0]:
            raise ValueError(f"the prompt holds {len(rows)} image tokens for {features.shape[0]} image soft tokens")
        if len(rows):
            h[mx.array(rows), mx.array(cols)] = features.astype(h.dtype)
        if not self.args.bidirectional_images:
            return h, None
        starts = is_image & ~np.concatenate([np.zeros_like(is_image[:, :1]), is_image[:, :-1]], axis=1)
        blocks = np.where(is_image, np.cumsum(starts, axis=1) - 1, -1)
        return h, mx.array(blocks.astype(np.int32))

    def soft_embedding(self, probs: mx.array) -> mx.array:
        """Expected token embedding under ``probs`` [B, C, V], times the embed scale."""
        e = self.embed_tokens
        dtype = e.scales.dtype if isinstance(e, nn.QuantizedEmbedding) else e.weight.dtype
        probs = probs.astype(dtype)
        if isinstance(e, nn.QuantizedEmbedding):
            soft = mx.quantized_matmul(
                probs,
                e.weight,
                e.scales,
                e.get("biases"),
                transpose=False,
                group_size=e.group_size,
                bits=e.bits,
                mode=e.mode,
            )
        else:
            soft = probs @ e.weight
        return soft * self._embed_scale(dtype)

    def sparse_soft_embedding(self, tokens: mx.array, weights: mx.array) -> mx.array:
        """``soft_embedding`` of a distribution kept only at ``tokens`` [B, C, k]
        (``weights`` [B, C, k], renormalised here): k gathered embedding rows
        per position instead of a product over the whole vocabulary."""
        weights = weights / weights.sum(axis=-1, keepdims=True)
        rows = self.embed_tokens(tokens)  # [B, C, k, D], dequantized if need be
        soft = (weights[..., None].astype(rows.dtype) * rows).sum(axis=-2)
        return soft * self._embed_scale(rows.dtype)

    def logits(self, hidden: mx.array) -> mx.array:
        out = self.embed_tokens.as_linear(hidden).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        return softcap(out, cap) if cap else out

    def denoise(
        self,
        canvas: mx.array,
        cache: PromptCache,
        self_conditioning: Optional[mx.array] = None,
        self_conditioning_probs: Optional[mx.array] = None,
        soft_embedding: Optional[mx.array] = None,
    ) -> mx.array:
        """Float32 logits [B, C, V] for ``canvas`` given the cache; the cache is unchanged.

        ``self_conditioning`` is the previous step's processed logits, or None on
        a canvas' first step. A caller that already holds their softmax may pass
        ``self_conditioning_probs`` instead, saving a pass over the vocabulary,
        or the soft embedding [B, C, D] itself (``soft_embedding``).
        """
        h = self._embed(canvas)
        probs = self_conditioning_probs
        if probs is None and self_conditioning is not None:
            probs = mx.softmax(self_conditioning.astype(mx.float32), axis=-1)
        soft = soft_embedding if probs is None else self.soft_embedding(probs)
        h = self.self_conditioning(h, soft)
        return self.logits(self._run_layers(h, cache, encoding=False))

    def denoise_rows(
        self,
        canvas: mx.array,
        cache: PromptCache,
        rows: Optional[mx.array] = None,
        states: Optional[DecoderStates] = None,
        self_conditioning: Optional[mx.array] = None,
        self_conditioning_probs: Optional[mx.array] = None,
        soft_embedding: Optional[mx.array] = None,
    ) -> Tuple[mx.array, DecoderStates]:
        """``denoise``, computing only the canvas positions ``rows`` [B, A].

        An approximate step (a departure from the reference): every other
        position keeps what ``states`` (an earlier pass's) holds for it, its
        input to each layer and its logits, so the rows attend to keys and
        values that position had then. Only the key, value and query
        projections run over the whole canvas; the rows alone go through
        the rest of each layer and the LM head. ``rows`` None computes every
        position: the exact pass, which leaves fresh ``states``. Returns the
        logits [B, C, V] (the others' from ``states``) and the new states.
        """
        h = self._embed(canvas if rows is None else gather_rows(canvas, rows))
        probs = self_conditioning_probs
        if probs is None and self_conditioning is not None:
            probs = mx.softmax(self_conditioning.astype(mx.float32), axis=-1)
        if rows is not None:
            probs = None if probs is None else gather_rows(probs, rows)
            soft_embedding = None if soft_embedding is None else gather_rows(soft_embedding, rows)
        soft = soft_embedding if probs is None else self.soft_embedding(probs)
        h = self.self_conditioning(h, soft)
        masks = self._masks(cache, canvas.shape[1], causal=False)
        h = self._stage_input(h)
        inputs = []
        for i, (layer, c, sliding) in enumerate(zip(self.layers, cache, self.sliding_layers)):
            x = h if rows is None else scatter_rows(states.inputs[i], rows, h)
            inputs.append(x)
            h = layer(x, c, masks[sliding], False, rows)
        logits = self.logits(self.norm(self._stage_output(h)))
        if rows is not None:
            logits = scatter_rows(states.logits, rows, logits)
        return logits, DecoderStates(inputs, logits)

    @property
    def dtype(self):
        return self.norm.weight.dtype
