"""Merge trained adapters into a model directory that every command loads.

``python -m mlx_diffgemma.fuse --model M --adapter-path A --save-path OUT``
writes OUT as a checkpoint of our own layout: the adapted weights (LoRA and
DoRA merged into the layers they adapt; a full fine-tune's weights as
trained), in the dtypes the model's checkpoint stores, beside the model's
config, generation config and tokenizer files. OUT is written in a staging
directory and renamed at the end; an existing OUT is replaced only with
``force``, and only if it is a model directory.
"""

import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_model

from .convert import check_replaceable, staged_directory
from .tuner.adapters import fuse as fuse_layers
from .tuner.adapters import load_adapters
from .utils import get_model_path, load_model, load_safetensors, sanitize

# Files of the source directory that the fused model keeps as they are.
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


def _stored_dtypes(model_path: Path) -> dict:
    tensors, _ = load_safetensors(model_path)  # lazy: only headers are read
    weights, _ = sanitize(tensors)
    return {name: value.dtype for name, value in weights.items()}


def fuse(model: str, adapter_path: str, save_path: str, force: bool = False, revision: Optional[str] = None) -> Path:
    """Write ``model`` with the adapters of ``adapter_path`` merged to ``save_path``."""
    target = Path(save_path).expanduser()
    check_replaceable(target, force)
    model_path = get_model_path(model, revision)
    if target.resolve() == model_path.resolve():
        raise ValueError(f"--save-path {target}: is the model itself; choose another directory")
    net = load_model(model_path)
    load_adapters(net, adapter_path)
    fuse_layers(net)
    dtypes = _stored_dtypes(model_path)
    weights = [(k, v.astype(dtypes[k]) if k in dtypes else v) for k, v in tree_flatten(net.parameters())]
    net.update(tree_unflatten(weights))
    with staged_directory(target, force) as staging:
        for f in model_path.iterdir():
            if f.is_file() and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(f, staging / f.name)
        save_model(staging, net)
    mx.clear_cache()
    return target


if __name__ == "__main__":
    # The command line lives in the cli package; the library never imports it.
    from .cli.fuse import main

    main()
