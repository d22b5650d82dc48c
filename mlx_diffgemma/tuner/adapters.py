"""Adapters as mlx-lm makes them: which layers train, and saving, loading, fusing.

An adapter directory holds ``adapters.safetensors`` (the trained parameters)
and ``adapter_config.json`` (the training options, ``fine_tune_type``,
``num_layers`` and ``lora_parameters`` among them), as ``mlx_lm.lora`` writes
them. The LoRA and DoRA layers are mlx-lm's.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .. import cpu_experts

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")

# What LoRA adapts by default: attention and the dense MLP of each layer.
# The router stays frozen (retraining it moves tokens between experts the
# adapter does not cover); the experts can be named in ``keys`` as
# "experts.switch_glu.gate_proj" and so on.
DEFAULT_LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
DEFAULT_LORA_PARAMETERS = {"rank": 8, "dropout": 0.0, "scale": 20.0}
_ADAPTER_LEAVES = {"lora_a", "lora_b", "m"}


class AdapterError(ValueError):
    """An adapter that does not fit the model; the message names the file."""


def lora_parameters(config: Optional[dict]) -> dict:
    params = dict(DEFAULT_LORA_PARAMETERS, **(config or {}))
    params.setdefault("keys", list(DEFAULT_LORA_KEYS))
    return params


def _layer_count(model, num_layers: int) -> int:
    n = len(model.layers)
    if num_layers == -1:
        return n
    if not 1 <= num_layers <= n:
        raise AdapterError(f"--num-layers {num_layers}: the model has {n} layers (use 1 to {n}, or -1 for all)")
    return num_layers


def is_quantized(module: nn.Module) -> bool:
    return any("scales" in m for _, m in module.named_modules())


def prepare(
    model,
    fine_tune_type: str,
    num_layers: int,
    lora_config: Optional[dict] = None,
    train_router: bool = False,
) -> dict:
    """Freeze the model and make trainable what ``fine_tune_type`` trains.

    ``lora``/``dora``: mlx-lm's LoRA layers on ``keys`` of the last
    ``num_layers`` layers. ``full``: every weight of those layers; with all
    layers (-1), also the embedding, the final norm and self-conditioning,
    so a model can be trained from scratch. The router trains only with
    ``train_router``. Returns the ``lora_parameters`` used (None for full).
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise AdapterError(f"--fine-tune-type {fine_tune_type!r}: expected one of {', '.join(FINE_TUNE_TYPES)}")
    n = _layer_count(model, num_layers)
    model.freeze()
    params = None
    if fine_tune_type == "full":
        if is_quantized(model):
            raise AdapterError("--fine-tune-type full: the model is quantized; train LoRA on it (QLoRA) instead")
        if n == len(model.layers):
            model.unfreeze()
        else:
            for layer in model.layers[-n:]:
                layer.unfreeze()
    else:
        params = lora_parameters(lora_config)
        try:
            linear_to_lora_layers(model, n, params, use_dora=fine_tune_type == "dora")
        except (KeyError, ValueError) as e:
            raise AdapterError(f"lora_parameters: {e}") from None
    first = len(model.layers) - n
    for i, layer in enumerate(model.layers):
        if train_router and i >= first:
            layer.router.unfreeze()
        else:
            layer.router.freeze()
    if not tree_flatten(model.trainable_parameters()):
        raise AdapterError("nothing to train: lora_parameters.keys names no layer of this model")
    return params


def trainable_weights(model) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def atomic_write(path: Path, write):
    """``write(temporary_path)``, then rename it to ``path``: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapters(model, path: Path):
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, trainable_weights(model)))


def save_adapter_config(config: dict, path: Path):
    text = json.dumps(config, indent=4, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_adapter_config(adapter_path: Path) -> dict:
    path = adapter_path / CONFIG_FILE
    if not adapter_path.is_dir():
        raise AdapterError(f"{adapter_path}: no such adapter directory")
    if not path.is_file():
        raise AdapterError(f"{path}: missing (an adapter directory holds {ADAPTER_FILE} and {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise AdapterError(f"{path}: fine_tune_type {kind!r} is not one of {', '.join(FINE_TUNE_TYPES)}")
    if not isinstance(config.get("num_layers", -1), int):
        raise AdapterError(f"{path}: num_layers must be an integer")
    return config


def load_adapters(model, adapter_path, weights_file: Optional[Path] = None):
    """Apply the adapter in directory ``adapter_path`` to ``model``, in place.

    Every tensor of the adapter file must be a trainable parameter of the
    adapted model with the same shape; anything else is an error naming the
    file and tensor.
    """
    adapter_path = Path(adapter_path).expanduser()
    config = read_adapter_config(adapter_path)
    kind = config.get("fine_tune_type", "lora")
    source = adapter_path / CONFIG_FILE
    if kind != "full":
        n = config.get("num_layers", -1)
        try:
            linear_to_lora_layers(
                model, _layer_count(model, n), lora_parameters(config.get("lora_parameters")), use_dora=kind == "dora"
            )
        except (KeyError, ValueError) as e:
            raise AdapterError(f"{source}: {e}") from None
    weights_file = Path(weights_file) if weights_file else adapter_path / ADAPTER_FILE
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:
        raise AdapterError(f"{weights_file}: cannot read ({str(e).splitlines()[0] if str(e) else e})") from None
    check_adapter_weights(model, weights, weights_file, full=kind == "full")
    model.load_weights(list(weights.items()), strict=False)
    cpu_experts.upcast_experts(model)
    mx.eval(model.parameters())
    model.adapter_path = str(adapter_path)
    return model


def check_adapter_weights(model, weights: Dict[str, mx.array], source: Path, full: bool):
    params = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        want = params.get(name)
        if want is None or (not full and name.rsplit(".", 1)[-1] not in _ADAPTER_LEAVES):
            raise AdapterError(f"{source}: tensor {name} is not an adapter parameter of this model")
        if tuple(value.shape) != tuple(want.shape):
            raise AdapterError(
                f"{source}: tensor {name} has shape {list(value.shape)}, the model's is {list(want.shape)}"
            )
    if not weights:
        raise AdapterError(f"{source}: holds no tensors")


def fuse(model) -> nn.Module:
    """Merge every LoRA/DoRA layer into the weights it adapts, in place."""
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
