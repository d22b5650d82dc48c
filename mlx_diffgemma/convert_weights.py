"""The converter's plan and writer: what each tensor becomes (cast,
quantized, dequantized or passed through), planned from the shapes alone, then
written block by block into shards whose headers were written up front.
"""

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.utils import MAX_FILE_SIZE_GB

from .config import ConfigError, ModelArgs
from .model import Model
from .recipes import DEFAULT_RECIPE, HIGH_PRECISION, RECIPES, module_quantization, piece
from .shards import ShardError, ShardWriter, Slot, dtype_name, read_header, read_rows
from .staging import ConvertError
from .utils import (
    LoadError,
    check_weights,
    has_vision_weights,
    quantize_as_stored,
    sanitize,
    shard_files,
)

# Source bytes per block; peak memory is a few times this.
BLOCK_BYTES = 64 << 20
# Output shard size, mlx-lm's (5 GiB; a larger tensor gets a shard of its own).
SHARD_BYTES = MAX_FILE_SIZE_GB << 30


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
    if args.vision is not None and not has_vision_weights(weights):
        args.vision = None  # a text-only source (converted before vision was read): stays text-only
    model = Model(args)  # random weights, never evaluated: shapes only
    stored = {}
    if "quantization" in config:
        try:
            stored = quantize_as_stored(model, config["quantization"], weights)
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
            continue  # the tied head
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
        shards = shard_files(model_path)
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


def output_config(config: dict, plan: Plan, dtype: Optional[str]) -> dict:
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
