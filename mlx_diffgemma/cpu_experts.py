"""The experts on MLX's CPU backend. Metal needs none of this.

Two CPU gaps in MLX's ``gather_mm``, which mlx-lm's SwitchGLU runs the experts
with:

- It multiplies the (token, expert) pairs one row at a time: with a real BLAS
  about ten times a matmul of the same FLOPs (13x measured at the mini
  preset's widths with OpenBLAS). With enough pairs, ``switch_glu`` gathers
  them into per-expert groups and runs one batched matmul per projection
  instead. Metal's ``gather_mm`` groups sorted rows itself.
- It has float32 only. ``upcast_experts`` casts unquantized expert weights to
  float32 once, at load, rather than on every step. Metal runs any float.

Quantized experts keep ``gather_qmm`` on either backend.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

# Grouping pays once most experts get a row (pairs >= experts) and an
# expert's matrix no longer sits in the cache: below this many weights each
# row's matrix-vector product is already cheap (benchmarks/experts_crossover.py).
MIN_GROUPED_EXPERT_WEIGHTS = 1 << 16

# Groups are padded to the largest one; past this much padding (routing
# piled onto few experts) gather_mm does less work.
MAX_GROUPED_PADDING = 4


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def expert_groups_on_host(glu: SwitchGLU, pairs: int) -> bool:
    """Whether the experts may run as one batched matmul over per-expert groups.

    Only on the CPU, for unquantized experts without bias, with at least as
    many (token, expert) pairs as experts and matrices of at least
    ``MIN_GROUPED_EXPERT_WEIGHTS`` weights.
    """
    proj = glu.up_proj
    if not on_cpu() or type(proj) is not SwitchLinear:
        return False
    experts, out_dims, in_dims = proj.weight.shape
    return "bias" not in proj and pairs >= experts and out_dims * in_dims >= MIN_GROUPED_EXPERT_WEIGHTS


def grouped_switch_glu(glu: SwitchGLU, x: mx.array, indices: mx.array) -> Optional[mx.array]:
    """``glu(x, indices)`` with the rows of each expert gathered into a group.

    The (token, expert) pairs are sorted by expert and their rows gathered
    into groups padded to the largest one, [experts, capacity, hidden]; one
    batched matmul per projection then runs every expert over its group. The same sums as
    SwitchGLU, up to the order of additions inside a matmul. The capacity is
    read on the host (one sync per layer, which the CPU backend, running ops in
    order, barely notices). Returns None when routing is so uneven that the
    padding would cost more than gather_mm.
    """
    k = indices.shape[-1]
    experts = glu.up_proj.weight.shape[0]
    flat = indices.flatten()
    pairs = flat.size
    counts = (flat[:, None] == mx.arange(experts)).sum(axis=0)
    capacity = counts.max().item()
    if experts * capacity > MAX_GROUPED_PADDING * pairs:
        return None

    # Group slot (expert e, rank r) takes the r-th pair routed to e, or a row
    # of zeros past e's count.
    order = mx.argsort(flat)
    first = mx.cumsum(counts) - counts
    rank = mx.arange(capacity)
    filled = rank < counts[:, None]
    pair = order[mx.minimum(first[:, None] + rank, pairs - 1)]
    tokens = x.reshape(-1, x.shape[-1])
    padded = mx.concatenate([tokens, mx.zeros_like(tokens[:1])])
    groups = padded[mx.where(filled, pair // k, tokens.shape[0])]

    def project(layer, h):
        return h @ mx.swapaxes(layer.weight, -1, -2)

    h = glu.activation(project(glu.up_proj, groups), project(glu.gate_proj, groups))
    y = project(glu.down_proj, h).reshape(experts * capacity, -1)
    # Each pair's row in y: its expert's group, at its rank within the group.
    expert = flat[order]
    slot = (expert * capacity + mx.arange(pairs) - first[expert])[mx.argsort(order)]
    return y[slot].reshape(*indices.shape, -1)


def switch_glu(glu: SwitchGLU, x: mx.array, indices: mx.array) -> mx.array:
    """``glu(x, indices)``: grouped per expert where that is faster, else as is."""
    if expert_groups_on_host(glu, indices.size):
        y = grouped_switch_glu(glu, x, indices)
        if y is not None:
            return y
    return glu(x, indices)


def upcast_experts(model: nn.Module):
    """On the CPU, cast every unquantized SwitchLinear's weight to float32.

    Any module tree: the match is on the class name, so mlx-lm's SwitchLinear
    (ours) and mlx-vlm's (a class of its own) both count; quantized ones
    (with ``scales``) keep gather_qmm and are left alone. Off the CPU, nothing.
    """
    if not on_cpu():
        return
    for _, module in model.named_modules():
        if type(module).__name__ == "SwitchLinear" and "scales" not in module and module.weight.dtype != mx.float32:
            module.weight = module.weight.astype(mx.float32)
