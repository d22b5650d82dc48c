"""Finding, reading and checking checkpoints."""

import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config

from . import cpu_experts, distributed
from .config import ConfigError, ModelArgs, eos_token_ids
from .images import ImageError, ImageProcessor
from .model import Model
from .tokenizer import TokenizerError, load_tokenizer
from .tuner.adapters import load_adapters

logger = logging.getLogger("mlx_diffgemma")

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"

# What MLX accepts per quantization mode: bit widths, group sizes, and the
# defaults (mlx.nn's and mlx-lm's) used when a setting is not given.
MODES = {
    "affine": dict(bits=(2, 3, 4, 5, 6, 8), group_sizes=(32, 64, 128), default_bits=4, default_group_size=64),
    "mxfp4": dict(bits=(4,), group_sizes=(32,), default_bits=4, default_group_size=32),
    "mxfp8": dict(bits=(8,), group_sizes=(32,), default_bits=8, default_group_size=32),
    "nvfp4": dict(bits=(4,), group_sizes=(16,), default_bits=4, default_group_size=16),
}

_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
]


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id ("owner/name") rather than a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def get_model_path(
    path_or_repo: str, revision: Optional[str] = None, pipeline_group: Optional[mx.distributed.Group] = None
) -> Path:
    """A local directory as is, or a Hub repo downloaded with huggingface_hub
    (with ``pipeline_group``, only the shards this process's stage reads)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path}: not a model directory")
        try:
            next(path.iterdir(), None)
        except OSError as e:
            raise LoadError(f"{path}: cannot read the model directory ({e.strerror})") from None
        return path
    # Anything that does not exist and is not a Hub id is a bad path.
    if not is_hub_id(path_or_repo):
        raise LoadError(f"{path_or_repo}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        if pipeline_group is None or pipeline_group.size() == 1:
            return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=_HUB_PATTERNS))
        # The config and the index first: they say which shards hold the stage's tensors.
        others = [p for p in _HUB_PATTERNS if p != "*.safetensors"]
        meta = Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=others))
        shards = stage_shards(meta, pipeline_group)
        patterns = _HUB_PATTERNS if shards is None else others + shards
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=patterns))
    except LoadError:
        raise
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise LoadError(
            f"{path_or_repo}: cannot download it from the Hugging Face Hub ({type(e).__name__}): the Hub "
            "could not be reached, or has no such repo for this account; to use a model on this machine, "
            "pass its directory instead (a path such as ./diffusiongemma-26B-A4B-it)"
        ) from e


def stage_shards(model_path: Path, group: mx.distributed.Group) -> Optional[List[str]]:
    """The shard files holding the tensors this process's pipeline stage reads,
    from the checkpoint's index (None without an index: one file, read whole)."""
    index_file = model_path / "model.safetensors.index.json"
    if not index_file.exists():
        return None
    weight_map = _weight_map(index_file)
    try:
        args = ModelArgs.from_dict(load_config(model_path), source=str(model_path / "config.json"))
    except ConfigError as e:
        raise LoadError(str(e)) from e
    start, stop = distributed.stage_layers(args.num_hidden_layers, group)
    stage = distributed.Stage(group, group.rank(), group.size(), start, stop)
    return sorted(
        {
            str(file)
            for name, file in weight_map.items()
            if any(distributed.stage_name(new, stage) is not None for new in rename(name))
        }
    )


def load_config(model_path: Path) -> dict:
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise LoadError(f"{config_file}: missing")
    return read_json(config_file)


def read_json(path: Path):
    """A JSON file's contents, or LoadError naming the file."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def shard_files(model_path: Path, only: Optional[List[str]] = None) -> list:
    """The checkpoint's shard files (``only``: those of these names the index lists)."""
    index_file = model_path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = _weight_map(index_file)
        names = sorted(set(weight_map.values()))
        shards = [model_path / name for name in names if only is None or name in only]
        for shard in shards:
            if not shard.exists():
                raise LoadError(f"{shard}: missing (listed in {index_file.name})")
        return shards
    shards = sorted(model_path.glob("*.safetensors"))
    if not shards:
        raise LoadError(f"{model_path}: no *.safetensors weights")
    return shards


def _weight_map(index_file: Path) -> dict:
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index_file}: not a safetensors index (no weight_map)")
    return weight_map


def load_safetensors(model_path: Path, only: Optional[List[str]] = None) -> Tuple[Dict[str, mx.array], Dict[str, Path]]:
    """All tensors of a checkpoint (``only``: of those shards), lazily
    (nothing is read before it is used), and the shard each came from."""
    weights, files = {}, {}
    for shard in shard_files(model_path, only):
        try:
            tensors = mx.load(str(shard))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"{shard}: cannot read ({msg})") from e
        weights.update(tensors)
        files.update(dict.fromkeys(tensors, shard))
    return weights, files


_DECODER = "model.decoder."
_ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
VISION_MODULES = tuple(m + "." for m in distributed.VISION_MODULES)  # ours
# Experts as Hugging Face stores them (fused gate/up, no ".weight") and as
# mlx-vlm stores them (the same names with ".weight", ".scales", ".biases").
_FUSED_EXPERTS = re.compile(r"(.*\.experts\.)(gate_up_proj|down_proj)(\.weight|\.scales|\.biases)?$")


def rename(name: str) -> List[str]:
    """Our names for a checkpoint tensor: none (skipped), one, or two (fused gate/up).

    Reads the Hugging Face layout, mlx-vlm's layout and our own.
    """
    if name == "lm_head.weight":
        return []  # the head is tied to the embedding
    if name.startswith(_VISION):
        return [name[len("model.encoder.") :]]
    m = _ENCODER_SCALAR.match(name)
    if m:
        return [f"layers.{m.group(1)}.encoder_layer_scalar"]
    key = name[len(_DECODER) :] if name.startswith(_DECODER) else name
    m = _FUSED_EXPERTS.match(key)
    if m:
        base, proj, suffix = m.group(1) + "switch_glu.", m.group(2), m.group(3) or ".weight"
        if proj == "down_proj":
            return [f"{base}down_proj{suffix}"]
        return [f"{base}gate_proj{suffix}", f"{base}up_proj{suffix}"]
    return [key]


def sanitize(weights: Dict[str, mx.array]) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """Map checkpoint tensor names to ours.

    Returns the renamed tensors and, for error messages, each new name's
    original. Names already in our layout (converted checkpoints) pass through.
    """
    out, origin = {}, {}
    for name, value in weights.items():
        names = rename(name)
        if len(names) == 2:
            # Rows [0, I) are the gate, [I, 2I) the up projection. Quantized
            # groups run along the last axis, so packed weights, scales and
            # biases split the same way.
            values = mx.split(value, 2, axis=-2)
        else:
            values = [value] * len(names)
        for new, v in zip(names, values):
            out[new] = v
            origin[new] = name
    return out, origin


def has_vision_weights(weights) -> bool:
    """Whether the (sanitized) weights include a vision tower; checkpoints
    converted text-only keep the vision_config but not its tensors."""
    return any(name.startswith(VISION_MODULES) for name in weights)


def check_quantization(quantization, source: str = "config.json"):
    """The config's ``quantization`` block as MLX can use it, else LoadError
    naming ``source`` and the entry: a dict of settings ("bits",
    "group_size", "mode") and per-module entries (a dict of settings, or a
    bool)."""
    if not isinstance(quantization, dict):
        raise LoadError(f"{source}: quantization must be an object (got {type(quantization).__name__})")

    def settings(entry: dict, where: str):
        mode = entry.get("mode", "affine")
        if mode not in MODES:
            raise LoadError(f"{source}: {where}mode {mode!r} is not one of {', '.join(MODES)}")
        for key, allowed in (("bits", MODES[mode]["bits"]), ("group_size", MODES[mode]["group_sizes"])):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or value not in allowed):
                listed = ", ".join(map(str, allowed))
                raise LoadError(f"{source}: {where}{key} {value!r} is not allowed in mode {mode} ({listed})")

    settings({k: quantization[k] for k in ("bits", "group_size", "mode") if k in quantization}, "")
    for path, entry in quantization.items():
        if isinstance(entry, dict):
            settings(entry, f"quantization of {path}: ")
        elif isinstance(entry, (list, tuple)) or entry is None:
            # Other scalars are metadata some converters add (e.g. quant_method).
            raise LoadError(
                f"{source}: quantization of {path} must be an object of settings or true/false (got {entry!r})"
            )


def stored_quantization(
    model: nn.Module, quantization: dict, weights: Dict[str, mx.array], source: str = "config.json"
) -> Dict[str, dict]:
    """The ``to_quantized`` arguments of each module the checkpoint stores quantized.

    As in mlx-lm, a module named in the ``quantization`` block takes that entry
    (a dict, or False for a module kept in float); other modules with ``scales``
    get theirs from the tensors' shapes. Entries may use the names of any layout
    ``rename`` reads (mlx-vlm writes ``model.decoder.layers.0.experts.gate_up_proj``).
    """
    check_quantization(quantization, source)
    overrides = {}
    for path, entry in quantization.items():
        if isinstance(entry, (dict, bool)):
            for name in rename(f"{path}.weight"):
                overrides[name[: -len(".weight")]] = entry
    params = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            continue
        entry = overrides.get(path, True)
        if isinstance(entry, dict):
            # mlx-lm leaves the mode out of affine entries; complete it here
            # so every user of these settings sees them whole.
            params[path] = dict(entry, mode=entry.get("mode", "affine"))
        elif entry:
            try:
                params[path] = infer_quant_config(path, module, weights)
            except ValueError as e:
                raise LoadError(str(e)) from e
    return params


def quantize_as_stored(
    model: Model, quantization: dict, weights: Dict[str, mx.array], source: str = "config.json"
) -> Dict[str, dict]:
    """Quantize the modules a converted checkpoint stores quantized (mlx-lm's format)."""
    params = stored_quantization(model, quantization, weights, str(source))
    nn.quantize(model, class_predicate=lambda path, _: params.get(path, False))
    return params


def check_weights(
    model: Model, weights: Dict[str, mx.array], origin: Dict[str, str], files: Optional[Dict[str, Path]] = None
):
    """Every parameter present with its shape and kind of dtype, and nothing unknown.

    ``origin`` maps our names to the checkpoint's, ``files`` the checkpoint's
    names to their shard, for the messages.
    """
    expected = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        source = origin.get(name, name)
        where = f"{files[source]}: " if files and source in files else ""
        if name not in expected:
            raise LoadError(f"{where}unexpected tensor {source} in checkpoint")
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape):
            raise LoadError(f"{where}tensor {source} has shape {list(value.shape)}, expected {list(want.shape)}")
        # Floats where the model has floats; integers only where it packs
        # quantized weights (uint32).
        if mx.issubdtype(value.dtype, mx.floating) != mx.issubdtype(want.dtype, mx.floating):
            kind = "floating-point" if mx.issubdtype(want.dtype, mx.floating) else str(want.dtype).split(".")[-1]
            raise LoadError(
                f"{where}tensor {source} has dtype {str(value.dtype).split('.')[-1]}, expected {kind} values"
            )
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"missing tensor {missing[0]}{more} in checkpoint")


def load_model(
    model_path: Path,
    lazy: bool = False,
    pipeline_group: Optional[mx.distributed.Group] = None,
    tensor_group: Optional[mx.distributed.Group] = None,
) -> Model:
    """The checkpoint at ``model_path`` as a ``Model``.

    With ``pipeline_group`` this process keeps (and reads) only its stage of
    the layers; with ``tensor_group``, its share of every layer's heads and
    widths (``distributed``). The weights are read a layer at a time, so a
    process never holds more than its share and one layer's tensors whole.
    """
    config = load_config(model_path)
    try:
        args = ModelArgs.from_dict(config, source=str(model_path / "config.json"))
    except ConfigError as e:
        raise LoadError(str(e)) from e
    pipelined = pipeline_group is not None and pipeline_group.size() > 1
    # A pipeline stage opens only the shards holding its tensors (all it may have downloaded).
    tensors, files = load_safetensors(model_path, stage_shards(model_path, pipeline_group) if pipelined else None)
    weights, origin = sanitize(tensors)
    if args.vision is not None and not has_vision_weights(weights):
        logger.info("%s: no vision-tower weights; the model reads text only.", model_path)
        args.vision = None
    model = Model(args)
    if pipelined:
        stage = distributed.pipeline(model, pipeline_group)
        names = {name: distributed.stage_name(name, stage) for name in weights}
        # Other stages' layers are left out: never read.
        weights = {new: weights[old] for old, new in names.items() if new is not None}
        origin = {new: origin.get(old, old) for old, new in names.items() if new is not None}
    if "quantization" in config:
        quantize_as_stored(model, config["quantization"], weights, model_path / "config.json")
    check_weights(model, weights, origin, files)
    model.load_weights(list(weights.items()), strict=True)
    del weights, tensors  # what no module holds (other stages' layers) is never read
    if tensor_group is not None:
        distributed.shard(model, tensor_group)
    cpu_experts.upcast_experts(model)
    if not lazy:
        try:
            for layer in model.layers:  # a layer's whole tensors at a time, then only its slices
                mx.eval(layer.parameters())
            mx.eval(model.parameters())
        except Exception as e:
            raise LoadError(f"{model_path}: cannot read weights ({str(e).splitlines()[0]})") from e
    model.eval()
    model.generation_config = _load_generation_config(model_path)
    model.path = str(model_path)  # named by errors about what the weights produce
    if args.vision is not None:
        try:
            model.image_processor = ImageProcessor.from_checkpoint(model_path, config)
        except ImageError as e:
            raise LoadError(str(e)) from None
    return model


def _load_generation_config(model_path: Path) -> dict:
    path = model_path / "generation_config.json"
    if not path.exists():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return config


def load(
    path_or_repo: str = DEFAULT_MODEL,
    revision: Optional[str] = None,
    lazy: bool = False,
    adapter_path: Optional[str] = None,
    pipeline_group: Optional[mx.distributed.Group] = None,
    tensor_group: Optional[mx.distributed.Group] = None,
):
    """Load a DiffusionGemma checkpoint: ``model, tokenizer = load(path_or_repo)``.

    ``adapter_path`` names a directory of adapters trained by
    ``mlx_diffgemma.lora`` to apply. ``tokenizer`` is None when the
    checkpoint carries no tokenizer files.
    """
    model_path = get_model_path(path_or_repo, revision, pipeline_group)
    model = load_model(model_path, lazy=lazy, pipeline_group=pipeline_group, tensor_group=tensor_group)
    if adapter_path is not None:
        if model.stage is not None or model.tensor_group is not None:
            raise LoadError(f"{adapter_path}: adapters cannot be applied to a split model; fuse them first")
        load_adapters(model, adapter_path)
    try:
        tokenizer = load_tokenizer(model_path, eos_token_ids=eos_token_ids(model.generation_config, model.args))
    except OSError as e:
        raise LoadError(f"{e.filename or model_path}: cannot read ({e.strerror or e})") from None
    except TokenizerError as e:
        raise LoadError(str(e)) from None
    return model, tokenizer
