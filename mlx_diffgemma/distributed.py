"""One model over several processes, with MLX's own distributed engine.

Launched with ``mlx.launch`` (ring over TCP or Thunderbolt, JACCL over
Thunderbolt 5 RDMA), every process runs the same program on the same
inputs; they split the weights one of two ways:

- **pipeline** (``pipeline``): the layers in consecutive stages, one per
  process. Each holds and reads only its stage's layers (plus the
  embedding, the final norm and the self-conditioning MLP, which every
  stage keeps); a stage hands its hidden states to the next with
  ``send``/``recv`` and the last stage's output reaches every process with
  one ``all_gather``. A forward pass still runs its stages one after
  another: this splits memory, not time.
- **tensor** (``shard``): every layer's attention heads, dense MLP width and
  each expert's width split across the processes, which run at once; the
  partial outputs meet in one ``all_sum`` after attention and one after the
  feed-forward block. It splits memory and compute, and costs two
  exchanges of [rows, positions, hidden] per layer.

Either way every process ends a forward pass with the same logits, so the
sampler (seeded alike) draws the same tokens everywhere, and those equal a
single process's for the same seed (tensor parallelism sums in another
order: equal up to rounding). Process 0 speaks for the group: it prints,
reads the terminal and serves HTTP; ``broadcast_text`` hands what it read
to the rest.
"""

import pickle
import re
import secrets
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

STRATEGIES = ("tensor", "pipeline")


@dataclass(frozen=True)
class Stage:
    """The layers ``[start, stop)`` of the stack, run by process ``rank`` of ``size``."""

    group: mx.distributed.Group
    rank: int
    size: int
    start: int
    stop: int


def init() -> mx.distributed.Group:
    """The group this process was launched in (a group of one without mlx.launch)."""
    return mx.distributed.init()


def is_primary(group: Optional[mx.distributed.Group] = None) -> bool:
    """Whether this process speaks for the group (rank 0)."""
    return (group or init()).rank() == 0


def even_split(total: int, parts: int, unit: int = 1) -> List[int]:
    """Boundaries [0, ..., total] cutting ``total`` into ``parts`` runs of whole
    ``unit``s, as even as they can be (the first runs take the remainder)."""
    if total % unit:
        raise ValueError(f"{total} is not a multiple of {unit}")
    units = total // unit
    if units < parts:
        raise ValueError(f"{total} cannot be split {parts} ways in runs of {unit}")
    base, extra = divmod(units, parts)
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + (base + (r < extra)) * unit)
    return bounds


# -- Pipeline ----------------------------------------------------------------


def stage_layers(
    num_layers: int, group: mx.distributed.Group, split: Optional[Sequence[int]] = None
) -> Tuple[int, int]:
    """The layers ``[start, stop)`` of this process's stage: ``split`` gives each
    stage's count (default: as even as possible, the first stages taking one more)."""
    size, rank = group.size(), group.rank()
    if split is None:
        bounds = even_split(num_layers, size)
    else:
        split = list(split)
        if len(split) != size or any(n <= 0 for n in split) or sum(split) != num_layers:
            raise ValueError(
                f"a pipeline split of {num_layers} layers over {size} processes needs {size} positive "
                f"counts summing to {num_layers} (got {split})"
            )
        bounds = [sum(split[:r]) for r in range(size + 1)]
    return bounds[rank], bounds[rank + 1]


def pipeline(model: nn.Module, group: mx.distributed.Group, split: Optional[Sequence[int]] = None) -> Stage:
    """Keep only this process's stage of ``model``'s layers (before its weights
    are read). Only the first stage reads images: the others take their input
    from the stage before, so they keep no vision tower."""
    start, stop = stage_layers(len(model.layers), group, split)
    model.layers = model.layers[start:stop]
    if group.rank() > 0:
        for tower in VISION_MODULES:
            if tower in model:
                delattr(model, tower)
    model.__dict__.pop("sliding_layers", None)  # a cached property of the old stack
    model.stage = Stage(group, group.rank(), group.size(), start, stop)
    return model.stage


_LAYER = re.compile(r"^layers\.(\d+)\.")
VISION_MODULES = ("vision_tower", "embed_vision")


def stage_name(name: str, stage: Stage) -> Optional[str]:
    """A checkpoint tensor's (sanitized) name in the stage's model: its own
    layers are numbered from 0; another stage's layer has none, nor, on a
    stage after the first, the vision tower's tensors."""
    if stage.rank > 0 and name.split(".", 1)[0] in VISION_MODULES:
        return None
    m = _LAYER.match(name)
    if m is None:
        return name
    layer = int(m.group(1))
    if not stage.start <= layer < stage.stop:
        return None
    return f"layers.{layer - stage.start}.{name[m.end() :]}"


# -- Tensor parallelism -----------------------------------------------------------


def _group_size(module: nn.Module) -> int:
    """The input-feature unit a slice of ``module``'s inputs must keep whole."""
    return module.group_size if "scales" in module else 1


def _cut(module: nn.Module, axis_of, start: int, stop: int):
    """``module``'s parameters sliced along the axis ``axis_of(name)`` gives,
    ``[start, stop)`` in the parameter's own units (see the callers)."""
    update = {}
    for name, value in module.parameters().items():
        if not isinstance(value, mx.array):
            continue
        axis, lo, hi = axis_of(name, value, start, stop)
        if axis is None:
            continue
        index = [slice(None)] * value.ndim
        index[axis] = slice(lo, hi)
        update[name] = mx.contiguous(value[tuple(index)])
    module.update(update)


def slice_outputs(module: nn.Module, start: int, stop: int):
    """Keep output features ``[start, stop)`` of a linear or switch layer (float
    or quantized): rows of the weight, its scales and biases."""

    def axis_of(name, value, lo, hi):
        if name == "bias":
            return -1, lo, hi
        return value.ndim - 2, lo, hi

    _cut(module, axis_of, start, stop)


def slice_inputs(module: nn.Module, start: int, stop: int):
    """Keep input features ``[start, stop)`` (whole quantization groups) of a
    linear or switch layer; a bias, added once, is kept by the first slice only."""
    quantized = "scales" in module
    if quantized and (start % module.group_size or stop % module.group_size):
        raise ValueError(f"inputs {start}:{stop} cut a quantization group of {module.group_size}")

    def axis_of(name, value, lo, hi):
        if name == "bias":
            return None, 0, 0
        if not quantized:
            return value.ndim - 1, lo, hi
        if name == "weight":  # packed: 32 // bits inputs to a uint32
            return value.ndim - 1, lo * module.bits // 32, hi * module.bits // 32
        return value.ndim - 1, lo // module.group_size, hi // module.group_size  # scales, biases

    _cut(module, axis_of, start, stop)
    if "bias" in module and start > 0:
        module.bias = mx.zeros_like(module.bias)


def _shard_attention(attn: nn.Module, group: mx.distributed.Group):
    size, rank = group.size(), group.rank()
    heads, kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if heads % size:
        raise ValueError(f"{heads} attention heads cannot be split over {size} processes")
    per = heads // size
    group_q = heads // kv_heads  # query heads per key/value head
    if per % group_q and group_q % per:
        raise ValueError(f"{heads} query heads over {kv_heads} key/value heads cannot be split over {size} processes")
    q0, q1 = rank * per, (rank + 1) * per
    # The key/value heads this process's queries read (shared ones are
    # repeated on the processes that share them).
    kv0, kv1 = q0 // group_q, (q1 - 1) // group_q + 1
    slice_outputs(attn.q_proj, q0 * head_dim, q1 * head_dim)
    slice_outputs(attn.k_proj, kv0 * head_dim, kv1 * head_dim)
    if "v_proj" in attn:
        slice_outputs(attn.v_proj, kv0 * head_dim, kv1 * head_dim)
    slice_inputs(attn.o_proj, q0 * head_dim, q1 * head_dim)
    attn.n_heads, attn.n_kv_heads = per, kv1 - kv0
    attn.group = group


def _shard_glu(gate: nn.Module, up: nn.Module, down: nn.Module, width: int, group: mx.distributed.Group):
    """Split a gated MLP's hidden ``width`` (every expert's alike, for switch
    layers) at whole quantization groups of ``down``."""
    bounds = even_split(width, group.size(), _group_size(down))
    lo, hi = bounds[group.rank()], bounds[group.rank() + 1]
    slice_outputs(gate, lo, hi)
    slice_outputs(up, lo, hi)
    slice_inputs(down, lo, hi)


def shard(model: nn.Module, group: mx.distributed.Group):
    """Tensor parallelism over ``group``, in place: each process keeps its share
    of every layer's heads, MLP width and experts' width (slices of the
    weights, which need not be read yet: only the slices are kept)."""
    if group.size() == 1:
        return
    args = model.args
    for layer in model.layers:
        _shard_attention(layer.self_attn, group)
        mlp = layer.mlp
        _shard_glu(mlp.gate_proj, mlp.up_proj, mlp.down_proj, args.intermediate_size, group)
        glu = layer.experts.switch_glu
        _shard_glu(glu.gate_proj, glu.up_proj, glu.down_proj, args.moe_intermediate_size, group)
        layer.group = group
    model.tensor_group = group


# -- Process 0 speaks for the group ------------------------------------------------


def random_seed() -> int:
    """A fresh random seed, the same on every process of the launched group
    (process 0 draws it): their canvases must start from the same noise."""
    seed = secrets.randbits(62)
    if init().size() == 1:
        return seed
    return int(broadcast_text(str(seed)))


def broadcast_bytes(data: Optional[bytes], group: Optional[mx.distributed.Group] = None) -> bytes:
    """Process 0's ``data`` on every process (the others pass None)."""
    group = group or init()
    if group.size() == 1:
        return data or b""
    primary = group.rank() == 0
    size = mx.array([len(data) if primary else 0], dtype=mx.int32)
    size = mx.distributed.all_sum(size, group=group, stream=mx.cpu).item()
    if size == 0:
        return b""
    # The others add zeros: the sum is process 0's bytes.
    values = mx.array(np.frombuffer(data, dtype=np.uint8)) if primary else mx.zeros((size,), dtype=mx.uint8)
    values = mx.distributed.all_sum(values, group=group, stream=mx.cpu)
    return bytes(np.array(values))


def broadcast_object(value: Any = None, group: Optional[mx.distributed.Group] = None) -> Any:
    """Process 0's ``value`` (anything pickle takes) on every process; the
    others pass nothing. The bytes are process 0's own ``pickle.dumps`` of its
    own objects, read only by processes of the group it launched with."""
    group = group or init()
    if group.size() == 1:
        return value
    data = broadcast_bytes(pickle.dumps(value) if group.rank() == 0 else None, group)
    return pickle.loads(data)


def broadcast_text(text: Optional[str], group: Optional[mx.distributed.Group] = None) -> Optional[str]:
    """Process 0's ``text`` (None included) on every process."""
    data = None if not is_primary(group) else (b"\x00" if text is None else b"\x01" + text.encode())
    data = broadcast_bytes(data, group)
    return None if data[:1] != b"\x01" else data[1:].decode()
