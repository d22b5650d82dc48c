"""Merge trained adapters into a model directory that every command loads.

``python -m mlx_diffgemma.fuse --model M --adapter-path A --save-path OUT``
writes OUT as a checkpoint of our own layout: the adapted weights (LoRA and
DoRA merged into the layers they adapt; a full fine-tune's weights as
trained), in the dtypes the model's checkpoint stores, beside the model's
config, generation config and tokenizer files. OUT is written in a staging
directory and renamed at the end; an existing OUT is replaced only with
``force``, and only if it is a model directory. OUT may not be, hold or sit
inside the model or the adapter directory: replacing it, or a model written
into the model it was made from, would lose what it was made from.
"""

import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_model

from ..staging import check_replaceable, staged_directory
from ..tuner.adapters import fuse as fuse_layers
from ..tuner.adapters import load_adapters
from ..utils import get_model_path, load_model, load_safetensors, sanitize

# Files of the source directory that the fused model keeps as they are.
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


def _stored_dtypes(model_path: Path) -> dict:
    tensors, _ = load_safetensors(model_path)  # lazy: only headers are read
    weights, _ = sanitize(tensors)
    return {name: value.dtype for name, value in weights.items()}


def check_apart(target: Path, what: str, other: Path):
    """Refuse a save path that is ``other``, inside it, or holding it."""
    t, o = target.resolve(), other.resolve()
    if t == o:
        raise ValueError(f"--save-path {target}: is {what}; choose another directory")
    if o in t.parents:
        raise ValueError(f"--save-path {target}: inside {what} {other}; choose a directory outside it")
    if t in o.parents:
        raise ValueError(f"--save-path {target}: holds {what} {other}; choose another directory")


def fuse(model: str, adapter_path: str, save_path: str, force: bool = False, revision: Optional[str] = None) -> Path:
    """Write ``model`` with the adapters of ``adapter_path`` merged to ``save_path``."""
    target = Path(save_path).expanduser()
    adapters = Path(adapter_path).expanduser()
    check_apart(target, "the adapter directory", adapters)
    if Path(model).expanduser().exists():  # before the "exists" check below: it says more
        check_apart(target, "the model directory", Path(model).expanduser())
    check_replaceable(target, force, "--save-path")
    model_path = get_model_path(model, revision)
    check_apart(target, "the model directory", model_path)
    net = load_model(model_path)
    load_adapters(net, adapters)
    fuse_layers(net)
    dtypes = _stored_dtypes(model_path)
    weights = [(k, v.astype(dtypes[k]) if k in dtypes else v) for k, v in tree_flatten(net.parameters())]
    net.update(tree_unflatten(weights))
    with staged_directory(target, force, "--save-path") as staging:
        for f in model_path.iterdir():
            if f.is_file() and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(f, staging / f.name)
        save_model(staging, net)
    mx.clear_cache()
    return target
