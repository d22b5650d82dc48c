"""The benchmark's run: its options, checked before anything is built, the
timed generation, the evaluation, and everything together as a JSON-ready dict."""

import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from .. import blas, distributed
from ..generate import stream_generate
from ..model import Model
from ..recipes import RECIPES
from ..sampler_params import SamplerParams
from ..utils import get_model_path, load
from .breakdown import run_breakdown
from .common import NEVER_CONFIDENT, median, set_dtype, step_intervals, weight_bytes
from .compare import COMPARISONS, compare_autoregressive, compare_mlx_vlm, compare_transformers, require
from .machine import load_average, machine_info
from .plot import check_plot_path, plot_tradeoff
from .presets import PRESETS, quantize, random_model, random_prompts, write_hf_checkpoint
from .work import VARIANTS, answer_check, evaluate, evaluation_file, generation_flops, read_problems


@dataclass
class Options:
    preset: str = "tiny"
    model: Optional[str] = None
    prompt_tokens: int = 512
    max_tokens: int = 256
    batch_size: int = 1
    fixed_steps: Optional[int] = None
    dtype: Optional[str] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    recipe: Optional[str] = None
    breakdown: bool = False
    repeats: int = 5
    compare: List[str] = field(default_factory=list)
    seed: int = 0
    self_conditioning_top_k: int = 0
    fast: bool = False
    data: Optional[str] = None
    limit: Optional[int] = None
    variants: List[str] = field(default_factory=list)
    metric: str = "exact"
    plot: Optional[str] = None
    pipeline: bool = False  # under mlx.launch: split the layers, not the heads and experts


def sampler_overrides(fixed_steps: Optional[int], vocab: int, top_k: int = 0, fast: bool = False) -> dict:
    """stream_generate settings: the checkpoint's (or ``fast``), or fixed steps
    with stopping and EOS off; ``top_k`` sparse self-conditioning."""
    overrides = {}
    if fast:
        overrides["fast"] = True
    if top_k:
        overrides["self_conditioning_top_k"] = top_k
    if fixed_steps is None:
        return overrides
    # An id outside the vocabulary is never generated, so no canvas ends early.
    return dict(
        overrides,
        max_denoising_steps=fixed_steps,
        confidence_threshold=NEVER_CONFIDENT,
        eos_token_id=[vocab],
    )


def run_generation(model: Model, prompts: List[List[int]], max_tokens: int, seed: int, params: SamplerParams) -> dict:
    """One timed generation (after a short warm-up), measured from its stream of responses."""
    batch = prompts if len(prompts) > 1 else prompts[0]
    warmup = replace(params, max_denoising_steps=min(2, params.max_denoising_steps))
    for _ in stream_generate(model, None, batch, max_tokens=model.canvas_length, seed=seed, params=warmup):
        pass
    # MLX's buffer cache stays warm: clearing it would make the first timed
    # steps pay the operating system for fresh pages.
    gc.collect()
    mx.reset_peak_memory()

    marks = []  # (canvas index, time a step's responses arrived)
    last = {}
    steps_seen = 0
    tic = time.perf_counter()
    canvases = math.ceil(max_tokens / model.canvas_length)
    for response in stream_generate(model, None, batch, max_tokens=max_tokens, seed=seed, params=params):
        now = time.perf_counter()
        # Every row reports each step; the first report of a new step count marks it.
        if response.denoising_steps > steps_seen:
            steps_seen = response.denoising_steps
            if not marks or marks[-1][0] != response.canvas_index:
                _log(f"  canvas {response.canvas_index + 1} of {canvases} (up to {params.max_denoising_steps} steps)")
            marks.append((response.canvas_index, now))
        last[response.row] = response
    total = time.perf_counter() - tic

    rows = [last[r] for r in sorted(last)]
    B, P = len(prompts), len(prompts[0])
    prompt_time = B * P / rows[0].prompt_tps
    canvases = marks[-1][0] + 1 if marks else 0
    per_canvas = [sum(1 for c, _ in marks if c == index) for index in range(canvases)]
    # A step's response can wait for the step queued ahead of it (the CPU
    # backend's reads wait for all queued work), so in a canvas of two steps
    # the interval between them is no step at all: time longer canvases only.
    steps = step_intervals([m for m in marks if per_canvas[m[0]] >= 3])
    if marks and max(per_canvas) == 1:
        # One step per canvas (nothing runs ahead): the first step from the prompt's end.
        steps = [marks[0][1] - tic - prompt_time]
    step_time = median(steps)
    tokens = sum(r.generation_tokens for r in rows)
    flops = generation_flops(model.args, B, P, per_canvas, params.self_conditioning_top_k)
    committed = sum(r.generation_tokens + (r.stop_token is not None) for r in rows)
    return dict(
        batch_size=B,
        prompt_tokens=P,
        prompt_time_s=prompt_time,
        prompt_tps=rows[0].prompt_tps,
        step_time_s=step_time,
        step_times_s=steps,
        denoising_steps=rows[0].denoising_steps,
        canvases=canvases,
        steps_per_canvas=rows[0].denoising_steps / max(canvases, 1),
        tokens_per_forward=statistics.mean(r.tokens_per_forward for r in rows),
        generation_tokens=tokens,
        generation_time_s=total - prompt_time,
        generation_tps=tokens / max(total - prompt_time, 1e-9),
        end_to_end_time_s=total,
        end_to_end_tps=tokens / total,
        canvas_positions_per_s=B * model.canvas_length / step_time if step_time else None,
        peak_memory_gb=max(r.peak_memory for r in rows),
        denoise_flops_per_token=flops["denoise"] / max(committed, 1),
        flops_per_token=(flops["denoise"] + flops["encode"]) / max(committed, 1),
    )


def _mode(options: Options) -> str:
    mode = (
        f"{options.fixed_steps} fixed steps (stopping and EOS off)"
        if options.fixed_steps
        else ("the fast setting" if options.fast else "checkpoint sampler") + " (adaptive stopping)"
    )
    if options.self_conditioning_top_k:
        mode += f", self-conditioning on the top {options.self_conditioning_top_k} tokens"
    return mode


def run_evaluation(model: Model, tokenizer, options: Options) -> dict:
    """Accuracy and work per committed token of each variant on the evaluation set."""
    path = evaluation_file(options.data)
    problems = read_problems(path, options.limit)
    names = options.variants or list(VARIANTS)
    if "reference" not in names:
        names = ["reference"] + names  # what the others are measured against
    variants = {}
    for name in names:
        _log(f"Evaluating {name!r} on {len(problems)} problems of {path}...")
        variants[name] = evaluate(
            model, tokenizer, problems, seed=options.seed, metric=options.metric, **VARIANTS[name]
        )
    reference = variants["reference"]
    for v in variants.values():
        v["fewer_flops_than_reference"] = reference["flops_per_token"] / v["flops_per_token"]
        v["fewer_denoise_flops_than_reference"] = reference["denoise_flops_per_token"] / v["denoise_flops_per_token"]
        v["accuracy_change_points"] = 100 * (v["accuracy"] - reference["accuracy"])
    return dict(data=str(path), problems=len(problems), metric=options.metric, variants=variants)


# ---------------------------------------------------------------------------
# Putting it together.


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


def validate(options: Options):
    """Options that cannot run, before anything is built or timed; ValueError names the flag."""
    if options.model is None and options.preset not in PRESETS:
        raise ValueError(f"unknown preset {options.preset!r} (choose from {', '.join(PRESETS)})")
    for name in ("prompt_tokens", "max_tokens", "batch_size", "repeats"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be at least 1")
    if options.fixed_steps is not None and options.fixed_steps < 1:
        raise ValueError("--fixed-steps must be at least 1")
    if options.compare and distributed.init().size() > 1:
        raise ValueError("--compare runs the other implementations in one process: not under mlx.launch")
    unknown = set(options.compare) - set(COMPARISONS)
    if unknown:
        raise ValueError(f"unknown comparison {sorted(unknown)[0]!r} (choose from {', '.join(COMPARISONS)})")
    if options.compare and options.fixed_steps is None:
        raise ValueError("--compare needs --fixed-steps N: every implementation then runs exactly N steps")
    if options.recipe is not None and options.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {options.recipe!r} (choose from {', '.join(RECIPES)})")
    if options.self_conditioning_top_k < 0:
        raise ValueError("--self-conditioning-top-k must be at least 0")
    if options.limit is not None and options.limit < 1:
        raise ValueError("--limit must be at least 1")
    if options.data is not None:
        if options.model is None:
            raise ValueError("--data needs --model: random weights answer nothing")
        read_problems(evaluation_file(options.data), options.limit)  # a bad file fails before any timing
    unknown = [v for v in options.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    if options.variants and options.data is None:
        raise ValueError("--variants needs --data: they are compared by their accuracy")
    answer_check(options.metric)
    if options.plot is not None:
        if options.data is None:
            raise ValueError("--plot needs --data: it plots the variants' accuracy against their work")
        check_plot_path(options.plot)
    require(options.compare)


def _load_or_build(options: Options, checkpoint: Optional[Path]):
    """Our model, its tokenizer (None for a preset), its config dict, and where it came from."""
    if checkpoint is not None:
        model, tokenizer = load(str(checkpoint))
        config = json.loads((checkpoint / "config.json").read_text())
        source = options.model or f"preset {options.preset!r} (random weights, via a transformers checkpoint)"
        return model, tokenizer, config, source
    config = copy.deepcopy(PRESETS[options.preset])
    return random_model(config, options.seed), None, config, f"preset {options.preset!r} (random weights)"


def run_benchmark(options: Options) -> dict:
    """Everything the command reports, as a JSON-ready dict."""
    validate(options)
    advice = blas.slow_blas_advice()
    if advice:
        _log(advice)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="mlx_diffgemma_bench_") as tmp:
        checkpoint = Path(options.model).expanduser() if options.model else None
        if options.model and not checkpoint.exists():
            checkpoint = get_model_path(options.model)
        needs_hf = {"transformers", "mlx-vlm"} & set(options.compare)
        if needs_hf and checkpoint is None:
            _log(f"Writing the {options.preset} preset's random weights as a transformers checkpoint...")
            checkpoint = Path(tmp) / "checkpoint"
            write_hf_checkpoint(PRESETS[options.preset], checkpoint, options.seed)
        result = _run(options, checkpoint)
    machine["load_average_end"] = load_average()
    return dict(machine=machine, **result)


def _run(options: Options, checkpoint: Optional[Path]) -> dict:
    _log("Building the model..." if checkpoint is None else f"Loading {checkpoint}...")
    model, tokenizer, config, source = _load_or_build(options, checkpoint)
    dtype = getattr(mx, options.dtype) if options.dtype else None
    if dtype is not None:
        set_dtype(model, dtype)
    quantization = quantize(model, options.bits, options.group_size, options.recipe) if options.bits else None
    group = distributed.init()
    if group.size() > 1:  # launched by mlx.launch: each process keeps its share
        if options.pipeline:
            distributed.pipeline(model, group)
        else:
            distributed.shard(model, group)
        mx.eval(model.parameters())
        gc.collect()
        mx.clear_cache()

    args = model.args
    prompts = random_prompts(options.batch_size, options.prompt_tokens, args.vocab_size, options.seed)
    overrides = sampler_overrides(options.fixed_steps, args.vocab_size, options.self_conditioning_top_k, options.fast)
    params = SamplerParams.resolve(model, **overrides)
    result = dict(
        model=dict(
            source=source,
            dtype=str(model.dtype).replace("mlx.core.", ""),
            quantization=quantization,
            weights_gb=weight_bytes(model) / 1e9,  # this process's
            processes=group.size(),
            split=None if group.size() == 1 else ("pipeline" if options.pipeline else "tensor"),
            layers=args.num_hidden_layers,
            hidden_size=args.hidden_size,
            vocab_size=args.vocab_size,
            experts=f"{args.top_k_experts} of {args.num_experts} (width {args.moe_intermediate_size})",
            canvas_length=args.canvas_length,
        ),
        settings=dict(
            prompt_tokens=options.prompt_tokens,
            max_tokens=options.max_tokens,
            batch_size=options.batch_size,
            mode=_mode(options),
            sampler={k: v for k, v in asdict(params).items() if k != "eos_token_id"},
            seed=options.seed,
        ),
    )

    _log("Timing generation...")
    result["generation"] = run_generation(model, prompts, options.max_tokens, options.seed, params)
    if options.breakdown:
        _log("Timing the parts of one denoising step...")
        result["breakdown"] = run_breakdown(model, prompts, params, options.repeats, options.seed)
    if options.data:
        result["evaluation"] = run_evaluation(model, tokenizer, options)
        if options.plot:
            plot_tradeoff(result["evaluation"], Path(options.plot).expanduser(), title=source)
    del model
    gc.collect()
    mx.clear_cache()

    ours = result["generation"]
    comparisons = {}
    if "transformers" in options.compare:
        _log("Running the transformers reference...")
        comparisons["transformers"] = compare_transformers(checkpoint, prompts, options.max_tokens, params, ours)
    if "mlx-vlm" in options.compare:
        _log("Running mlx-vlm...")
        comparisons["mlx-vlm"] = compare_mlx_vlm(checkpoint, prompts, options.max_tokens, params, dtype, ours)
    if "ar" in options.compare:
        _log("Running autoregressive decoding with mlx-lm...")
        comparisons["ar"] = compare_autoregressive(config, prompts, options.max_tokens, dtype, options.seed, ours)
    if comparisons:
        result["compare"] = comparisons
    return result
