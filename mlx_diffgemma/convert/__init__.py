"""Convert DiffusionGemma weights from the Hub to MLX, quantized, in bounded memory.

    python -m mlx_diffgemma.convert --q-bits 4

Each tensor is converted in blocks of rows (a few experts, a few thousand
vocabulary rows): a block is read from the source shard, cast, quantized and
written to its place in the output shard, whose header was written up front
from the planned shapes. Memory holds one block whatever the model's size.

The output is built in a hidden directory beside ``--mlx-path`` and renamed
into place once complete and checked, so an interrupted run leaves nothing
half-written there; an existing output is replaced only with ``--force``, and
only after the new one is complete. The source is only read.
"""

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from .config import ConfigError, ModelArgs
from .model import Model
from .shards import ShardError, ShardWriter, Slot, dtype_name, read_header, read_rows
from .utils import (
    DEFAULT_MODEL,
    MODES,
    LoadError,
    _quantize,
    _shard_files,
    check_weights,
    get_model_path,
    load_config,
    load_model,
    sanitize,
)

logger = logging.getLogger("mlx_diffgemma")

DTYPES = ("float16", "bfloat16", "float32")
_SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# The model's quantizable pieces. The embedding is also the LM head and the
# self-conditioning table; the router picks experts (a discrete choice that
# small weight errors can flip).
PIECES = ("experts", "router", "embedding", "attention", "mlp", "self_conditioning")

# What each recipe does with each piece: "requested" takes the --q-* settings,
# "high" takes HIGH_PRECISION, None keeps the piece in --dtype. docs/convert.md
# has the measurements behind the default.
RECIPES = {
    "mixed": dict(
        experts="requested", router=None, embedding="high", attention="high", mlp="high", self_conditioning="high"
    ),
    "uniform": dict.fromkeys(PIECES, "requested"),
    "experts-only": dict(dict.fromkeys(PIECES, None), experts="requested"),
}
DEFAULT_RECIPE = "mixed"
HIGH_PRECISION = {"group_size": 64, "bits": 8, "mode": "affine"}

# Source bytes per block; peak memory is a few times this.
BLOCK_BYTES = 64 << 20
# Output shard size, mlx-lm's (5 GiB; a larger tensor gets a shard of its own).
SHARD_BYTES = MAX_FILE_SIZE_GB << 30

# Files carried over from the source besides the weights and config.json.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why, in one line."""


def piece(path: str) -> str:
    """Which piece of the model a quantizable module belongs to."""
    if ".experts." in path:
        return "experts"
    if path.endswith(".router.proj"):
        return "router"
    if path == "embed_tokens":
        return "embedding"
    if ".self_attn." in path:
        return "attention"
    if path.startswith("self_conditioning."):
        return "self_conditioning"
    if ".mlp." in path:
        return "mlp"
    raise ValueError(f"no recipe rule for module {path}")


def quantization_settings(
    q_bits: Optional[int] = None, q_group_size: Optional[int] = None, q_mode: Optional[str] = None
) -> dict:
    """The requested group_size, bits and mode, with the mode's defaults filled in."""
    mode = q_mode or "affine"
    if mode not in MODES:
        raise ConvertError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    rules = MODES[mode]
    bits = rules["default_bits"] if q_bits is None else q_bits
    group_size = rules["default_group_size"] if q_group_size is None else q_group_size
    if bits not in rules["bits"]:
        allowed = ", ".join(map(str, rules["bits"]))
        raise ConvertError(f"{mode} quantization takes {allowed} bits, not {bits}")
    if group_size not in rules["group_sizes"]:
        allowed = ", ".join(map(str, rules["group_sizes"]))
        raise ConvertError(f"{mode} quantization takes group size {allowed}, not {group_size}")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def module_quantization(
    recipe: Union[str, Dict[str, Optional[str]]], path: str, in_dims: int, requested: dict
) -> Optional[dict]:
    """How ``recipe`` quantizes the module at ``path`` (None: kept in float).

    ``recipe`` is a name from RECIPES or a table like theirs. A group size
    that does not divide the module's input width is lowered for affine
    modes (at 128 the real experts' down_proj, 704 wide, takes 64); where no
    allowed size divides it, the module stays in float.
    """
    table = RECIPES[recipe] if isinstance(recipe, str) else recipe
    choice = table[piece(path)]
    if choice is None:
        return None
    params = dict(requested if choice == "requested" else HIGH_PRECISION)
    sizes = [g for g in MODES[params["mode"]]["group_sizes"] if g <= params["group_size"]]
    for group_size in sorted(sizes, reverse=True):
        if in_dims % group_size == 0:
            return dict(params, group_size=group_size)
    return None


@dataclass
class Rules:
    """What happens to each tensor: cast, quantize, dequantize or pass through."""

    dtype: Optional[mx.Dtype]  # float tensors are cast to it (None: kept)
    quantize: Dict[str, dict] = field(default_factory=dict)  # module path -> params
    dequantize: Dict[str, dict] = field(default_factory=dict)  # module path -> stored params
    # Quantizable modules left in float, and why (for the summary).
    kept_float: Dict[str, str] = field(default_factory=dict)


def convert_arrays(arrays: Dict[str, mx.array], rules: Rules) -> Dict[str, mx.array]:
    """Source tensors (one weight, with its scales and biases if it has them)
    to output tensors in our layout. Lazy: nothing is computed until evaluated,
    so the plan can run it on placeholders for the output shapes alone."""
    weights, _ = sanitize(arrays)
    out = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        stored_quantized = f"{module}.scales" in weights
        if leaf in ("scales", "biases") and stored_quantized:
            if module not in rules.dequantize:
                out[name] = value  # kept as stored
            continue
        if stored_quantized:
            if module in rules.dequantize:
                value = mx.dequantize(
                    value,
                    weights[f"{module}.scales"],
                    weights.get(f"{module}.biases"),
                    **rules.dequantize[module],
                )
                out[name] = value.astype(rules.dtype) if rules.dtype else value
            else:
                out[name] = value
            continue
        if rules.dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(rules.dtype)
        params = rules.quantize.get(module) if leaf == "weight" else None
        if params is None:
            out[name] = value
            continue
        out[name], out[f"{module}.scales"], *biases = mx.quantize(value, **params)
        if biases:
            out[f"{module}.biases"] = biases[0]
    return out


@dataclass
class Job:
    """Source tensors converted together, and the output tensors they give."""

    sources: Dict[str, Slot]
    outputs: List[Tuple[str, str, Tuple[int, ...]]]  # (name, safetensors dtype, shape)
    rows: int  # blocks are cut along the first axis of sources and outputs alike
    chunked: bool

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources.values())

    def blocks(self) -> Iterator[Tuple[int, int]]:
        if not self.chunked:
            yield 0, self.rows
            return
        row_bytes = sum(s.row_bytes for s in self.sources.values())
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, self.rows, step):
            yield start, min(start + step, self.rows)


@dataclass
class Plan:
    jobs: List[Job]
    rules: Rules
    quantization: Optional[dict]  # the output config's quantization block
    parameters: int  # as mlx-lm counts them: a packed weight counts its unpacked size

    @property
    def outputs(self) -> List[Tuple[str, str, Tuple[int, ...]]]:
        return [o for job in self.jobs for o in job.outputs]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(dtype, shape) for _, dtype, shape in self.outputs)


def _nbytes(dtype: str, shape) -> int:
    return Slot(Path(), dtype, tuple(shape), 0).nbytes


def plan_conversion(
    config: dict,
    slots: Dict[str, Slot],
    quantize: Optional[dict] = None,
    recipe: Union[str, Dict[str, Optional[str]]] = DEFAULT_RECIPE,
    dequantize: bool = False,
    dtype: Optional[str] = None,
) -> Plan:
    """Check the source against the model and work out every output tensor.

    ``slots``: the source tensors (only their dtype and shape are used here).
    ``quantize``: requested settings from ``quantization_settings``, or None.
    Runs on a model and tensors that are never evaluated, so it costs no
    memory for the real model either.
    """
    try:
        args = ModelArgs.from_dict(config)
    except ConfigError as e:
        raise ConvertError(str(e)) from e
    placeholders = {name: mx.zeros(s.shape, s.mx_dtype) for name, s in slots.items()}
    weights, origin = sanitize(placeholders)
    model = Model(args)  # random weights, never evaluated: shapes only
    stored = {}
    if "quantization" in config:
        try:
            stored = _quantize(model, config["quantization"], weights)
        except (LoadError, TypeError, ValueError) as e:
            raise ConvertError(f"config.json: bad quantization block ({e})") from e
    try:
        check_weights(model, weights, origin, {name: slot.file for name, slot in slots.items()})
    except LoadError as e:
        raise ConvertError(str(e)) from e

    rules = Rules(getattr(mx, dtype) if dtype else None)
    if dequantize:
        if not stored:
            raise ConvertError("the source is not quantized: nothing to dequantize")
        rules.dequantize = stored
    elif quantize is not None:
        if stored:
            raise ConvertError(
                "the source is already quantized: convert from the float checkpoint (or pass --dequantize)"
            )
        table = RECIPES[recipe] if isinstance(recipe, str) else recipe
        for path, module in model.named_modules():
            if hasattr(module, "to_quantized"):
                in_dims = module.weight.shape[-1]
                params = module_quantization(recipe, path, in_dims, quantize)
                if params is not None:
                    rules.quantize[path] = params
                elif table[piece(path)] is None:
                    rules.kept_float[path] = "by the recipe"
                else:
                    mode = quantize["mode"] if table[piece(path)] == "requested" else HIGH_PRECISION["mode"]
                    rules.kept_float[path] = f"{in_dims} inputs fit no {mode} group size"

    # A weight stored quantized travels with its scales and biases.
    jobs, grouped = [], {}
    for name, slot in sorted(slots.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)):
        base, _, leaf = name.rpartition(".")
        key = f"{base}.weight" if leaf in ("scales", "biases") and f"{base}.weight" in slots else name
        grouped.setdefault(key, {})[name] = slot
    for sources in grouped.values():
        outputs = convert_arrays({n: placeholders[n] for n in sources}, rules)
        if not outputs:
            continue  # vision tower, tied head
        rows = next(iter(sources.values())).rows
        chunked = (
            rows > 1
            and all(s.rows == rows for s in sources.values())
            and all(a.ndim > 1 and a.shape[0] == rows for a in outputs.values())
        )
        jobs.append(
            Job(
                sources,
                [(name, dtype_name(a.dtype), tuple(a.shape)) for name, a in outputs.items()],
                rows,
                chunked,
            )
        )

    # How the output stores each module: as quantized now, or as it was stored.
    final = rules.quantize or ({} if dequantize else stored)
    quantization = None
    if final:
        if quantize is not None:
            defaults = dict(quantize)
        else:
            defaults = {
                k: config["quantization"][k] for k in ("group_size", "bits", "mode") if k in config["quantization"]
            }
        quantization = dict(defaults)
        plain = dict(defaults, mode=defaults.get("mode", "affine"))
        for job in jobs:  # in checkpoint order, for a readable config
            for name, _, _ in job.outputs:
                module = name.rpartition(".")[0]
                if name.endswith(".weight") and module in final and final[module] != plain:
                    quantization[module] = final[module]

    parameters = 0
    for job in jobs:
        for name, _, shape in job.outputs:
            module, _, leaf = name.rpartition(".")
            if module in final and leaf in ("scales", "biases"):
                continue
            size = math.prod(shape)
            parameters += size * 32 // final[module]["bits"] if module in final else size
    return Plan(jobs, rules, quantization, parameters)


def read_source(model_path: Path) -> Dict[str, Slot]:
    """Every tensor of every shard, with the shards checked for truncation."""
    try:
        shards = _shard_files(model_path)
    except LoadError as e:
        raise ConvertError(str(e)) from e
    slots = {}
    for shard in shards:
        try:
            slots.update(read_header(shard))
        except ShardError as e:
            raise ConvertError(str(e)) from e
    return slots


def _shard_names(plan: Plan) -> List[List[str]]:
    """Output tensors split into shards of at most SHARD_BYTES, as mlx-lm's make_shards."""
    shards, size = [], 0
    for name, dtype, shape in plan.outputs:
        nbytes = _nbytes(dtype, shape)
        if not shards or size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(plan: Plan, out_dir: Path, progress: bool = True) -> dict:
    """Write the shards block by block; return the safetensors index."""
    specs = {name: (dtype, shape) for name, dtype, shape in plan.outputs}
    shard_names = _shard_names(plan)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shard_names) > 1 else "model.safetensors"
    writers, weight_map = {}, {}
    shards = []
    try:
        for i, names in enumerate(shard_names):
            file_name = fmt.format(i + 1, len(shard_names))
            writer = ShardWriter(out_dir / file_name, [(n, *specs[n]) for n in names])
            shards.append(writer)
            for n in names:
                writers[n] = writer
                weight_map[n] = file_name
        bar = _progress_bar(sum(job.source_bytes for job in plan.jobs), progress)
        for job in plan.jobs:
            for start, stop in job.blocks():
                block = {
                    name: read_rows(slot, start, stop) if job.chunked else read_rows(slot)
                    for name, slot in job.sources.items()
                }
                out = convert_arrays(block, plan.rules)
                # A NaN or infinite weight makes a model that writes only
                # padding: refuse to write one (one more pass, in the same eval).
                finite = {n: mx.isfinite(a).all() for n, a in block.items() if mx.issubdtype(a.dtype, mx.floating)}
                mx.eval(out, finite)
                for name, ok in finite.items():
                    if not ok.item():
                        raise ConvertError(
                            f"{job.sources[name].file}: tensor {name} holds NaN or infinite values; "
                            "refusing to write a broken model"
                        )
                for name, array in out.items():
                    writers[name].write_rows(name, start, array)
                del block, out
                bar.update(job.source_bytes * (stop - start) // job.rows)
            mx.clear_cache()
        bar.close()
    finally:
        errors = []
        for writer in shards:
            try:
                writer.close()
            except RuntimeError as e:
                errors.append(e)
    if errors:  # reached only when nothing else went wrong
        raise errors[0]
    return {
        "metadata": {"total_size": plan.nbytes, "total_parameters": plan.parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    # tqdm hides itself when stderr is not a terminal (disable=None).
    return tqdm(total=total, unit="B", unit_scale=True, desc="Converting", disable=None if enabled else True)


def _output_config(config: dict, plan: Plan, dtype: Optional[str]) -> dict:
    out = copy.deepcopy(config)
    out.pop("quantization", None)
    out.pop("quantization_config", None)
    if plan.quantization:
        out["quantization"] = plan.quantization  # save_config adds quantization_config
    if dtype:
        for c in (out, out.get("text_config") or {}):
            for key in ("dtype", "torch_dtype"):
                if key in c:
                    c[key] = dtype
    return out


def model_card(name: str, base_model: Optional[str], license: Optional[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=["mlx", "diffusiongemma"],
        base_model=base_model,
        license=license,
    )
    source = f" from [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    return f"""---
{data.to_yaml()}
---

# {name}

DiffusionGemma converted to MLX{source} with mlx-diffgemma's
`python -m mlx_diffgemma.convert`. It runs with mlx-diffgemma, not mlx-lm: the
model generates by block diffusion.

```python
from mlx_diffgemma import load
from mlx_diffgemma.generate import generate

model, tokenizer = load("{name}")
print(generate(model, tokenizer, "Write a haiku about the sea."))
```
"""


def _source_license(model_path: Path) -> Optional[str]:
    readme = model_path / "README.md"
    if not readme.exists():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.license
    except Exception:  # a card without metadata is no reason to fail
        return None


def upload_to_hub(path: Path, upload_repo: str):
    """Upload a converted model, its card naming the repo it is uploaded to."""
    from huggingface_hub import HfApi, ModelCard

    card = ModelCard.load(path / "README.md")
    text = model_card(upload_repo, card.data.base_model, card.data.license)
    (path / "README.md").write_text(text)
    api = HfApi()
    api.create_repo(repo_id=upload_repo, exist_ok=True)
    # upload_large_folder (resumable) is gone from huggingface_hub 2.x.
    upload = getattr(api, "upload_large_folder", None) or api.upload_folder
    upload(folder_path=str(path), repo_id=upload_repo, repo_type="model")
    print(f"[INFO] Uploaded to https://huggingface.co/{upload_repo}")


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


# Written into every staging directory: a later run recognises the directory
# as a conversion's own, and whether the process that made it is gone.
STAGING_MARKER = ".mlx_diffgemma-conversion"


def is_model_directory(path: Path) -> bool:
    """Whether ``path`` looks like a model: a config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_replaceable(target: Path, force: bool, flag: str = "--mlx-path"):
    """Refuse to replace ``target`` unless asked to and it is recognisably a model.

    ``flag`` is the option that named ``target`` (fuse's is --save-path)."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise ConvertError(f"{target} already exists (pass --force to replace it)")
    if target.is_symlink() or not is_model_directory(target):
        raise ConvertError(
            f"{target} exists and is not a model directory (no config.json and weights); "
            f"not replacing it, even with --force: choose another {flag}"
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stagings(target: Path) -> List[Path]:
    """Delete what killed conversions to ``target`` left behind; returns what was deleted.

    Only directories holding our marker, whose process is gone, are touched.
    """
    removed = []
    for path in target.parent.glob(f".{target.name}.*.partial"):
        try:
            pid = int((path / STAGING_MARKER).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            print(f"[WARN] {path}: not left by mlx_diffgemma.convert; leaving it alone")
            continue
        if _process_alive(pid):
            continue  # another conversion to the same target, still running
        shutil.rmtree(path, ignore_errors=True)
        print(f"[INFO] Removed {path}, left by an interrupted conversion")
        removed.append(path)
    return removed


@contextmanager
def staged_directory(target: Path, force: bool, flag: str = "--mlx-path") -> Iterator[Path]:
    """A new directory that becomes ``target`` only if the block completes.

    It is made beside ``target`` (same filesystem, so the final rename is
    atomic). On any exception, KeyboardInterrupt included, it is deleted and
    ``target`` is left as it was. Only a model directory is ever replaced.
    A conversion killed outright leaves the staging directory behind; the
    next conversion to the same target removes it.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stagings(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise ConvertError(f"{target}: cannot write there ({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        (staging / STAGING_MARKER).write_text(f"{os.getpid()}\n")
        yield staging
        (staging / STAGING_MARKER).unlink()
        if target.exists() or target.is_symlink():
            check_replaceable(target, force, flag)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            target.rename(old)
            try:
                staging.rename(target)
            except BaseException:
                old.rename(target)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _default_dtype(config: dict) -> Optional[str]:
    """mlx-lm's rule: the dtype the source config names, if it is one we write."""
    for c in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if c.get(key) in DTYPES:
                return c[key]
    return None


def default_mlx_path(hf_path: str, quantize: Optional[dict], recipe, dtype: Optional[str]) -> str:
    """``diffusiongemma-26B-A4B-it-4bit`` and the like, in the working directory."""
    name = Path(hf_path.rstrip("/")).name or "model"
    if quantize is None:
        return f"{name}-{_SHORT_DTYPE.get(dtype, 'mlx')}"
    mode = quantize["mode"]
    tag = f"{quantize['bits']}bit" if mode == "affine" else mode
    if recipe != DEFAULT_RECIPE:
        tag += f"-{recipe}" if isinstance(recipe, str) else "-custom"
    return f"{name}-{tag}"


def describe_size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def describe_quantization(plan: Plan, dtype: Optional[str]) -> List[str]:
    """What was quantized how and what stayed in float and why, a line per piece of the model."""
    rules = plan.rules
    if not rules.quantize:
        return []
    lines = []
    for name in PIECES:
        counts: Dict[str, int] = {}
        for path, p in rules.quantize.items():
            if piece(path) == name:
                setting = f"{p['bits']}-bit {p['mode']} (group {p['group_size']})"
                counts[setting] = counts.get(setting, 0) + 1
        for path, why in rules.kept_float.items():
            if piece(path) == name:
                setting = f"kept in {dtype or 'float'} ({why})"
                counts[setting] = counts.get(setting, 0) + 1
        parts = [
            f"{n} module{'s' if n > 1 else ''} {'' if setting.startswith('kept') else 'at '}{setting}"
            for setting, n in counts.items()
        ]
        if parts:
            lines.append(f"{name}: {'; '.join(parts)}")
    return lines


def convert(
    hf_path: str = DEFAULT_MODEL,
    mlx_path: Optional[str] = None,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: Optional[str] = None,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    dequantize: bool = False,
    recipe: Union[str, Dict[str, Optional[str]], None] = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a DiffusionGemma checkpoint (local directory or Hub id) to MLX.

    Giving any of ``q_bits``, ``q_group_size``, ``q_mode`` or ``recipe``
    implies ``quantize``. ``recipe`` is a name from RECIPES or a table like
    theirs (piece -> "requested", "high" or None). Returns the output directory.
    """
    quantize = quantize or any(v is not None for v in (q_bits, q_group_size, q_mode, recipe))
    if quantize and dequantize:
        raise ConvertError("choose either quantization or --dequantize, not both")
    if isinstance(recipe, dict):
        if set(recipe) != set(PIECES) or not set(recipe.values()) <= {"requested", "high", None}:
            raise ConvertError(f"a recipe table maps each of {', '.join(PIECES)} to 'requested', 'high' or None")
    elif recipe is not None and recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    recipe = recipe or DEFAULT_RECIPE
    settings = quantization_settings(q_bits, q_group_size, q_mode) if quantize else None

    try:
        model_path = get_model_path(hf_path, revision)
        config = load_config(model_path)
    except LoadError as e:
        raise ConvertError(str(e)) from e
    dtype = dtype or _default_dtype(config)
    target = Path(mlx_path or default_mlx_path(hf_path, settings, recipe, dtype)).expanduser()
    source, resolved = model_path.resolve(), target.resolve()
    if _contains(source, resolved) or _contains(resolved, source):
        raise ConvertError(f"{target}: the output must be outside the source {model_path}")
    check_replaceable(target, force)

    slots = read_source(model_path)
    plan = plan_conversion(config, slots, settings, recipe, dequantize, dtype)
    print(f"[INFO] {model_path}: {len(slots)} tensors, {describe_size(sum(s.nbytes for s in slots.values()))}")
    quantization = describe_quantization(plan, dtype)
    print(
        f"[INFO] Writing {describe_size(plan.nbytes)} in {dtype or 'the source dtypes'}"
        + (", quantized:" if quantization else ", not quantized")
    )
    for line in quantization:
        print(f"[INFO]   {line}")
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
    if plan.nbytes > free:
        raise ConvertError(
            f"not enough disk space for {target}: {plan.nbytes / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free"
        )

    with staged_directory(target, force) as staging:
        index = write_weights(plan, staging, progress)
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        save_config(_output_config(config, plan, dtype), staging / "config.json")
        for name in COPIED_FILES:
            if (model_path / name).is_file():
                shutil.copyfile(model_path / name, staging / name)
        hub_id = None if Path(hf_path).expanduser().exists() else hf_path
        (staging / "README.md").write_text(model_card(target.name, hub_id, _source_license(model_path)))
        # The loader's own checks (names, shapes, quantization) on the result,
        # lazily: no weight is read.
        load_model(staging, lazy=True)
    print(f"[INFO] Saved {target}")

    if upload_repo is not None:
        upload_to_hub(target, upload_repo)
    return target


if __name__ == "__main__":
    # The command line lives in the cli package; the library never imports it.
    from .cli.convert import main

    main()
