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

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Union

from mlx_lm.utils import save_config

from ..convert_weights import Plan, output_config, plan_conversion, read_source, write_weights
from ..hub import model_card, source_license, upload_to_hub
from ..recipes import DEFAULT_RECIPE, PIECES, RECIPES, piece, quantization_settings
from ..staging import ConvertError, check_replaceable, contains, staged_directory
from ..utils import (
    DEFAULT_MODEL,
    VISION_MODULES,
    LoadError,
    get_model_path,
    load_config,
    load_model,
    rename,
)

DTYPES = ("float16", "bfloat16", "float32")
_SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

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
    # The image processor's settings (the vision tower's input).
    "processor_config.json",
    "preprocessor_config.json",
)


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
    text_only: bool = False,
) -> Path:
    """Convert a DiffusionGemma checkpoint (local directory or Hub id) to MLX.

    Giving any of ``q_bits``, ``q_group_size``, ``q_mode`` or ``recipe``
    implies ``quantize``. ``recipe`` is a name from RECIPES or a table like
    theirs (piece -> "requested", "high" or None). ``text_only`` leaves the
    vision tower out (1.15 GB of the released model in bf16). Returns the
    output directory.
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
    if contains(source, resolved) or contains(resolved, source):
        raise ConvertError(f"{target}: the output must be outside the source {model_path}")
    check_replaceable(target, force)

    slots = read_source(model_path)
    if text_only:
        slots = {n: slot for n, slot in slots.items() if not any(r.startswith(VISION_MODULES) for r in rename(n))}
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
        # mlx-lm's save_config drops vision_config unless told to keep it.
        vision = any(name.startswith(VISION_MODULES) for name, _, _ in plan.outputs)
        save_config(output_config(config, plan, dtype), staging / "config.json", keep_vision_config=vision)
        for name in COPIED_FILES:
            if (model_path / name).is_file():
                shutil.copyfile(model_path / name, staging / name)
        hub_id = None if Path(hf_path).expanduser().exists() else hf_path
        (staging / "README.md").write_text(model_card(target.name, hub_id, source_license(model_path)))
        # The loader's own checks (names, shapes, quantization) on the result,
        # lazily: no weight is read.
        load_model(staging, lazy=True)
    print(f"[INFO] Saved {target}")

    if upload_repo is not None:
        upload_to_hub(target, upload_repo)
    return target
