"""The checkpoint's vision tower (Gemma 4's) and the projection of its output
into the text model's embedding space.

An image arrives as patches (``images.ImageProcessor``): a [P, 3 * 16 * 16]
array of pixels in [0, 1] and each patch's (x, y) place in the grid. The tower
is a bidirectional transformer over the patches with a 2-D rotary embedding;
its output is averaged over 3 x 3 cells of patches, so an image becomes
P / 9 soft tokens, which take the place of the prompt's image tokens.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from .config import VisionArgs


class ClippableLinear(nn.Module):
    """A linear layer that may clamp its input and output to ranges stored
    with the checkpoint (``use_clipped_linears``; the released model has none)."""

    def __init__(self, args: VisionArgs, in_dims: int, out_dims: int):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        if args.use_clipped_linears:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def axial_rope(x: mx.array, positions: mx.array, theta: float) -> mx.array:
    """Rotate [.., P, heads, D] by the patches' (x, y) ``positions`` [P, 2]: the
    first half of each head by x, the second by y, each half as a non-interleaved
    rotary embedding of its own."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
    out = []
    for axis in range(2):
        angles = positions[:, axis : axis + 1].astype(mx.float32) * inv_freq  # [P, half / 2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None, :]  # [P, 1, half]
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        part = x[..., axis * half : (axis + 1) * half]
        a, b = part[..., : half // 2], part[..., half // 2 :]
        out.append(part * cos + mx.concatenate([-b, a], axis=-1) * sin)
    return mx.concatenate(out, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        dims, self.head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.theta = args.rope_theta
        self.q_proj = ClippableLinear(args, dims, self.n_heads * self.head_dim)
        self.k_proj = ClippableLinear(args, dims, self.n_kv_heads * self.head_dim)
        self.v_proj = ClippableLinear(args, dims, self.n_kv_heads * self.head_dim)
        self.o_proj = ClippableLinear(args, self.n_heads * self.head_dim, dims)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.eps = args.rms_norm_eps

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        B, P, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, P, self.n_heads, -1)), positions, self.theta)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, P, self.n_kv_heads, -1)), positions, self.theta)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(B, P, self.n_kv_heads, -1), None, self.eps)
        # Every patch sees every other (no mask); q/k norms replace the 1/sqrt(d) scale.
        out = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=1.0
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = ClippableLinear(args, args.hidden_size, args.intermediate_size)
        self.up_proj = ClippableLinear(args, args.hidden_size, args.intermediate_size)
        self.down_proj = ClippableLinear(args, args.intermediate_size, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        # Pixels in [0, 1] become [-1, 1] here (the processor does not normalise).
        table = self.position_embedding_table  # float, whether or not the projection is quantized
        h = self.input_proj((2 * (pixels - 0.5)).astype(table.dtype))
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class VisionTower(nn.Module):
    """Patches of one image -> its soft tokens [P / k^2, hidden] (k the pooling kernel)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixels: mx.array, positions: mx.array, grid: tuple) -> mx.array:
        """``pixels`` [P, 3 * patch^2] and ``positions`` [P, 2] of one image whose
        patches form ``grid`` (rows, columns), in row-major order."""
        h = self.patch_embedder(pixels, positions)[None]
        dtype = h.dtype
        for layer in self.encoder.layers:
            h = layer(h, positions)
        rows, cols = grid
        k = self.args.pooling_kernel_size
        # The mean of each k x k cell, cells in row-major order; in float32, as
        # the sqrt(hidden) scale can leave float16's range.
        h = h.astype(mx.float32).reshape(rows // k, k, cols // k, k, -1).mean(axis=(1, 3)).astype(dtype)
        h = h.reshape(-1, h.shape[-1]).astype(mx.float32) * math.sqrt(self.args.hidden_size)
        if self.args.standardize:
            h = (h - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return h.astype(dtype)


class VisionEmbedder(nn.Module):
    """Soft tokens -> the text model's embedding width (a norm without scale, then a projection)."""

    def __init__(self, args: VisionArgs, text_hidden_size: int):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.embedding_projection = nn.Linear(args.hidden_size, text_hidden_size, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(soft_tokens, None, self.eps))
