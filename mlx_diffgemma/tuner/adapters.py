"""Adapters as mlx-lm makes them: which layers train, and saving, loading, fusing.

An adapter directory holds ``adapters.safetensors`` (the trained parameters)
and ``adapter_config.json`` (the training options, ``fine_tune_type``,
``num_layers`` and ``lora_parameters`` among them), as ``mlx_lm.lora`` writes
them. The LoRA and DoRA layers are mlx-lm's.
"""

import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .. import cpu_experts
from ..files import atomic_write

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
# mlx_lm.lora's --num-layers default; a model with fewer layers adapts them all.
DEFAULT_NUM_LAYERS = 16
_ADAPTER_LEAVES = {"lora_a", "lora_b", "m"}


class AdapterError(ValueError):
    """An adapter that does not fit the model; the message names the file."""


def lora_parameters(config: Optional[dict]) -> dict:
    params = dict(DEFAULT_LORA_PARAMETERS, **(config or {}))
    params.setdefault("keys", list(DEFAULT_LORA_KEYS))
    return params


def layer_count(model, num_layers: Optional[int]) -> int:
    """How many layers, counted from the last, ``num_layers`` adapts: -1 all,
    None (not given) mlx-lm's default of 16 or all of a smaller model; a
    value given out of range is an error."""
    n = len(model.layers)
    if num_layers is None:
        return min(DEFAULT_NUM_LAYERS, n)
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
    num_layers: Optional[int],
    lora_config: Optional[dict] = None,
    train_router: bool = False,
) -> dict:
    """Freeze the model and make trainable what ``fine_tune_type`` trains.

    ``lora``/``dora``: mlx-lm's LoRA layers on ``keys`` of the last
    ``num_layers`` layers (None: mlx-lm's default, see ``layer_count``).
    ``full``: every weight of those layers; with -1, also the embedding, the
    final norm and self-conditioning, so a model can be trained from scratch.
    The router trains only with ``train_router``. Returns the
    ``lora_parameters`` used (None for full).
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise AdapterError(f"--fine-tune-type {fine_tune_type!r}: expected one of {', '.join(FINE_TUNE_TYPES)}")
    n = layer_count(model, num_layers)
    model.freeze()
    params = None
    if fine_tune_type == "full":
        if is_quantized(model):
            raise AdapterError("--fine-tune-type full: the model is quantized; train LoRA on it (QLoRA) instead")
        if num_layers == -1:
            model.unfreeze()
            # Training reads text: the vision tower gets no gradient, and with
            # weight decay an optimizer would still move it.
            for tower in ("vision_tower", "embed_vision"):
                if tower in model:
                    model[tower].freeze()
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


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it.

    Saving writes two files; an interrupt between them would leave weights
    and a config that disagree."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def save_adapters(model, path: Path, config: Optional[dict] = None):
    """The trainable weights to ``path`` and, given ``config``, adapter_config.json beside it.

    The two always agree on disk: an interrupt waits until both are written,
    and a config that would change is removed before the weights are
    replaced, so a run killed outright in between leaves weights without a
    config (which the loader refuses) rather than another run's config.
    """
    path = Path(path)
    config_path = path.parent / CONFIG_FILE
    with interrupts_deferred():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = None if config is None else _config_text(config)
        if text is not None and config_path.exists():
            try:
                same = config_path.read_text() == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                config_path.unlink()
        atomic_write(path, lambda tmp: mx.save_safetensors(tmp, trainable_weights(model)))
        if text is not None:
            atomic_write(config_path, lambda tmp: Path(tmp).write_text(text))


def _config_text(config: dict) -> str:
    return json.dumps(config, indent=4, sort_keys=True, default=str) + "\n"


def save_adapter_config(config: dict, path: Path):
    text = _config_text(config)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_adapter_config(adapter_path: Path) -> dict:
    path = adapter_path / CONFIG_FILE
    if adapter_path.is_file():
        raise AdapterError(
            f"{adapter_path}: a file, not an adapter directory (one holding {ADAPTER_FILE} and {CONFIG_FILE})"
        )
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
    if not isinstance(config.get("num_layers", -1), int) or isinstance(config.get("num_layers"), bool):
        raise AdapterError(f"{path}: num_layers must be an integer")
    if not isinstance(config.get("train_router", False), bool):
        raise AdapterError(f"{path}: train_router must be true or false")
    return config


def load_adapters(model, adapter_path, weights_file: Optional[Path] = None):
    """Apply the adapter in directory ``adapter_path`` to ``model``, in place.

    Every tensor of the adapter file must be a trainable parameter of the
    adapted model with the same shape (the routers' weights too when the
    config says ``train_router``: the trainer saves them); anything else is
    an error naming the file and tensor.
    """
    adapter_path = Path(adapter_path).expanduser()
    config = read_adapter_config(adapter_path)
    kind = config.get("fine_tune_type", "lora")
    source = adapter_path / CONFIG_FILE
    if kind != "full":
        n = config.get("num_layers", -1)
        try:
            linear_to_lora_layers(
                model, layer_count(model, n), lora_parameters(config.get("lora_parameters")), use_dora=kind == "dora"
            )
        except (KeyError, ValueError) as e:
            raise AdapterError(f"{source}: {e}") from None
    weights_file = Path(weights_file) if weights_file else adapter_path / ADAPTER_FILE
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:
        raise AdapterError(f"{weights_file}: cannot read ({str(e).splitlines()[0] if str(e) else e})") from None
    routers = router_layers(model, config.get("num_layers", -1)) if config.get("train_router") else ()
    check_adapter_weights(model, weights, weights_file, full=kind == "full", routers=routers)
    model.load_weights(list(weights.items()), strict=False)
    cpu_experts.upcast_experts(model)
    mx.eval(model.parameters())
    model.adapter_path = str(adapter_path)
    return model


def router_layers(model, num_layers: Optional[int]) -> range:
    """The layers whose router ``--train-router`` trains: those adapted."""
    n = len(model.layers)
    return range(n - layer_count(model, num_layers), n)


ROUTER_HINT = "a router's weight, which only training with train_router saves"


def check_adapter_weights(
    model, weights: Dict[str, mx.array], source: Path, full: bool, routers=(), router_hint: str = ROUTER_HINT
):
    """Each tensor must be a parameter the training could have saved: any
    weight for a full fine-tune, else a LoRA/DoRA leaf or a parameter of the
    routers of layers ``routers``; with the model's shape. ``router_hint``
    follows the error about a router's weight when routers are not allowed."""
    params = dict(tree_flatten(model.parameters()))
    router_prefixes = tuple(f"layers.{i}.router." for i in routers)
    for name, value in weights.items():
        want = params.get(name)
        adapter_leaf = name.rsplit(".", 1)[-1] in _ADAPTER_LEAVES or name.startswith(router_prefixes)
        if want is None or not (full or adapter_leaf):
            hint = ""
            if want is not None and ".router." in name and not router_prefixes:
                hint = f" ({router_hint})"
            raise AdapterError(f"{source}: tensor {name} is not an adapter parameter of this model{hint}")
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
