"""How fast DiffusionGemma runs here, where a denoising step spends its time,
and how that compares with the reference, mlx-vlm and autoregressive decoding.

    python -m mlx_diffgemma.benchmark --preset mini -p 512 -g 256 --fixed-steps 8 \\
        --breakdown --compare transformers mlx-vlm ar

A preset builds a model with random weights (offline, anywhere); ``--model``
loads a checkpoint. Timings are wall-clock medians with ``mx.eval`` around the
timed work. On Linux, MLX's CPU backend is much faster with a real BLAS:
preload OpenBLAS (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3``);
the report says which BLAS the process loaded. docs/benchmarks.md has the
numbers and how to read them.

Random weights never converge, so the checkpoint's adaptive stopping would run
every canvas to its step limit; ``--fixed-steps N`` turns stopping off (and
EOS, so every canvas is committed in full) for timings that do not depend on
the weights. Comparisons run that way only.
"""

import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import blas
from ..config import DEFAULT_ROPE, ModelArgs
from ..convert import DEFAULT_RECIPE, RECIPES, module_quantization, quantization_settings
from ..generate import stream_generate
from ..model import Model
from ..sampler_params import SamplerParams
from ..utils import get_model_path, load
from .breakdown import COMPONENT_NAMES, COMPONENTS, run_breakdown
from .common import NEVER_CONFIDENT, median, set_dtype, step_intervals, weight_bytes
from .compare import COMPARISONS, compare_autoregressive, compare_mlx_vlm, compare_transformers, require
from .work import VARIANT_HELP, VARIANTS, evaluate, evaluation_file, generation_flops, read_problems

# ---------------------------------------------------------------------------
# Presets: config dicts in the checkpoint's config.json format.

# The benchmark is text only; transformers and mlx-vlm still build a vision
# tower from the checkpoint, so it is kept minimal.
_TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=16,
)


def _preset(canvas_length: int = 256, **widths) -> dict:
    """A config with the released model's head counts, window and top-k
    unless ``widths`` says otherwise; full layers' heads are twice as wide."""
    text = dict(
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        sliding_window=1024,
        top_k_experts=8,
        max_position_embeddings=262_144,
        global_head_dim=2 * widths["head_dim"],
    )
    text.update(widths)
    layers = text["num_hidden_layers"]
    # The released pattern: five sliding-window layers, then one full layer.
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    text = dict(
        model_type="diffusion_gemma_text",
        layer_types=(pattern * math.ceil(layers / 6))[:layers],
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        rope_parameters=DEFAULT_ROPE,
        tie_word_embeddings=True,
        use_bidirectional_attention="vision",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        **text,
    )
    return dict(
        model_type="diffusion_gemma",
        architectures=["DiffusionGemmaForBlockDiffusion"],
        canvas_length=canvas_length,
        eos_token_id=[1, 106],
        tie_word_embeddings=True,
        text_config=text,
        vision_config=_TINY_VISION,
    )


PRESETS = {
    # Every structural feature at toy widths: runs in seconds anywhere.
    "tiny": _preset(
        canvas_length=32,
        hidden_size=128,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=128,
        vocab_size=4096,
        num_experts=8,
        top_k_experts=2,
        max_position_embeddings=16_384,
    ),
    # The real model's proportions at about 1/4 of its widths, 6 of its 30
    # layers (5 sliding + 1 full) and 1/4 of its vocabulary; real canvas and window.
    "mini": _preset(
        hidden_size=704,
        intermediate_size=528,
        moe_intermediate_size=176,
        num_hidden_layers=6,
        head_dim=64,
        vocab_size=65_536,
        num_experts=32,
    ),
    # google/diffusiongemma-26B-A4B-it's shapes (about 100 GB in float32).
    "full": _preset(
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_hidden_layers=30,
        head_dim=256,
        vocab_size=262_144,
        num_experts=128,
    ),
}


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


# ---------------------------------------------------------------------------
# The machine.


def _cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            return platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> Optional[float]:
    """The 1-minute load average: other busy processes inflate every timing."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    device = mx.default_device()
    return dict(
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        ram_gb=_ram_gb(),
        platform=f"{platform.system()} {platform.machine()}",
        mlx=mx.__version__,
        device="gpu (Metal)" if device.type == mx.DeviceType.gpu else "cpu",
        blas=blas.describe(),
        load_average_start=load_average(),
    )


# ---------------------------------------------------------------------------
# Building the model.


def random_model(config: dict, seed: int) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    model.eval()
    return model


def quantize(model: Model, bits: int, group_size: Optional[int], recipe: Optional[str]) -> str:
    """Quantize with one of the converter's recipes; a one-line description for the report."""
    recipe = recipe or DEFAULT_RECIPE
    requested = quantization_settings(q_bits=bits, q_group_size=group_size)

    def by_recipe(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return module_quantization(recipe, path, module.weight.shape[-1], requested) or False

    nn.quantize(model, class_predicate=by_recipe)
    mx.eval(model.parameters())
    return f"{bits}-bit (group {requested['group_size']}), recipe {recipe!r} from mlx_diffgemma.convert"


def write_hf_checkpoint(config: dict, path: Path, seed: int):
    """The preset's random weights as a Hugging Face checkpoint, written by transformers (float32)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    hf_config = DiffusionGemmaConfig(
        text_config=copy.deepcopy(config["text_config"]),
        vision_config=copy.deepcopy(config["vision_config"]),
        canvas_length=config["canvas_length"],
        eos_token_id=config.get("eos_token_id"),
    )
    model = DiffusionGemmaForBlockDiffusion(hf_config).to(torch.float32).eval()
    model.save_pretrained(path)


# ---------------------------------------------------------------------------
# Generation with our stream_generate.


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    return mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed)).tolist()


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
        variants[name] = evaluate(model, tokenizer, problems, seed=options.seed, **VARIANTS[name])
    reference = variants["reference"]
    for v in variants.values():
        v["fewer_flops_than_reference"] = reference["flops_per_token"] / v["flops_per_token"]
        v["fewer_denoise_flops_than_reference"] = reference["denoise_flops_per_token"] / v["denoise_flops_per_token"]
        v["accuracy_change_points"] = 100 * (v["accuracy"] - reference["accuracy"])
    return dict(data=str(path), problems=len(problems), variants=variants)


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

    args = model.args
    prompts = random_prompts(options.batch_size, options.prompt_tokens, args.vocab_size, options.seed)
    overrides = sampler_overrides(options.fixed_steps, args.vocab_size, options.self_conditioning_top_k, options.fast)
    params = SamplerParams.resolve(model, **overrides)
    result = dict(
        model=dict(
            source=source,
            dtype=str(model.dtype).replace("mlx.core.", ""),
            quantization=quantization,
            weights_gb=weight_bytes(model) / 1e9,
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


# ---------------------------------------------------------------------------
# The report.


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _fmt_bytes(gb: Optional[float]) -> str:
    if gb is None:
        return "-"
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.0f} MB"


def _rows(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _load_warning(machine: dict) -> List[str]:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if start is None:
        return []
    line = (
        f"Load average (1 min): {start:.2f} before the run, {_fmt(end, '.2f')} after it "
        f"(the run itself adds up to {machine['cores']})"
    )
    if start > 0.5:
        line += (
            "; the machine was busy in the minute before (an earlier run, or other processes, "
            "which would inflate these timings)"
        )
    return [line]


def format_report(result: dict) -> str:
    m, mod, s, g = result["machine"], result["model"], result["settings"], result["generation"]
    ram = f"{m['ram_gb']:.0f} GB RAM" if m["ram_gb"] else "RAM unknown"
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {ram}; MLX {m['mlx']} on {m['device']}; BLAS: {m['blas']}",
        f"Model: {mod['source']}, {mod['dtype']}"
        + (f", {mod['quantization']}" if mod["quantization"] else "")
        + f", {_fmt_bytes(mod['weights_gb'])} of weights",
        *_load_warning(m),
        f"Run: batch {s['batch_size']} x {s['prompt_tokens']} prompt tokens, {s['max_tokens']} new tokens, {s['mode']}",
        "",
        "Generation",
    ]
    lines += _rows(
        [
            ["prompt encode", f"{_fmt(g['prompt_tps'], '.1f')} tok/s", f"({_fmt(g['prompt_time_s'], '.3f')} s)"],
            [
                "denoising step (median)",
                f"{_fmt(g['step_time_s'], '.3f')} s",
                f"({len(g['step_times_s'])} steps timed)"
                if g["step_times_s"]
                else "(canvases of 2 steps are not timed: --breakdown times one)",
            ],
            [
                "denoising steps per canvas",
                _fmt(g["steps_per_canvas"], ".1f"),
                f"({g['denoising_steps']} steps, {g['canvases']} canvas{'es' if g['canvases'] != 1 else ''})",
            ],
            ["tokens per forward", _fmt(g["tokens_per_forward"], ".2f"), ""],
            [
                "committed tokens/s",
                _fmt(g["generation_tps"], ".2f"),
                f"({g['generation_tokens']} tokens; {_fmt(g['end_to_end_tps'], '.2f')} end to end)",
            ],
            ["canvas positions/s", _fmt(g["canvas_positions_per_s"], ".1f"), "(batch x canvas / step time)"],
            [
                "GFLOP per committed token",
                _fmt(g["flops_per_token"] / 1e9, ".4g"),
                f"({_fmt(g['denoise_flops_per_token'] / 1e9, '.4g')} denoising, the rest encoding canvases)",
            ],
            ["peak memory", _fmt_bytes(g["peak_memory_gb"]), ""],
        ]
    )

    b = result.get("breakdown")
    if b:
        lines += [
            "",
            f"One denoising step, by part (median of {b['repeats']}; cache {b['cache_length']} tokens; "
            f"self-conditioning from {b['self_conditioning_from']})",
        ]
        rows = [["part", "ms", "share", "GFLOP", "GFLOP/s", "matmul floor ms", "x floor"]]
        for name in COMPONENTS + ("remainder",):
            c = b["components"][name]
            rows.append(
                [
                    COMPONENT_NAMES[name],
                    _fmt(c["time_s"] and c["time_s"] * 1e3, ".1f"),
                    _fmt(c["share"] and c["share"] * 100, ".1f", "%"),
                    _fmt(c["gflop"] or None, ".2f"),
                    _fmt(c["gflops_per_s"], ".1f"),
                    _fmt(c["floor_s"] * 1e3 if c["floor_s"] else None, ".1f"),
                    _fmt(c["over_floor"], ".1f"),
                ]
            )
        rows.append(
            [
                "whole step",
                _fmt(b["step_time_s"] * 1e3, ".1f"),
                "100%",
                _fmt(b["gflop"], ".2f"),
                _fmt(b["gflops_per_s"], ".1f"),
                _fmt(b["matmul_floor_s"] * 1e3, ".1f"),
                _fmt(b["step_over_floor"], ".1f"),
            ]
        )
        t = b["transcendental_s"]
        lines += _rows(rows)
        lines.append(
            f"  floor with one exp ({_fmt(t['exp'] * 1e3, '.1f')} ms) and one tanh ({_fmt(t['tanh'] * 1e3, '.1f')} ms) "
            f"over the logits, each timed alone: {_fmt(b['full_floor_s'] * 1e3, '.1f')} ms; "
            f"the step is x{_fmt(b['step_over_full_floor'], '.2f')} of it"
        )
        if b["not_called"]:
            lines.append(f"  (not called as a submodule, so not timed: {', '.join(b['not_called'])})")

    e = result.get("evaluation")
    if e:
        lines += [
            "",
            f"Accuracy and work per committed token ({e['problems']} problems of {e['data']}; "
            "'x fewer' = the reference's FLOPs per token over the variant's; tok/s: committed tokens "
            "over the whole evaluation's time, prompts included)",
        ]
        rows = [
            [
                "variant",
                "exact match",
                "steps/canvas",
                "tokens/forward",
                "MFLOP/token",
                "x fewer",
                "denoising MFLOP/token",
                "x fewer",
                "tok/s",
            ]
        ]
        for name, v in e["variants"].items():
            rows.append(
                [
                    name,
                    f"{100 * v['accuracy']:.1f}%",
                    _fmt(v["steps_per_canvas"], ".3f"),
                    _fmt(v["tokens_per_forward"], ".2f"),
                    _fmt(v["flops_per_token"] / 1e6, ".2f"),
                    _fmt(v["fewer_flops_than_reference"], ".2f"),
                    _fmt(v["denoise_flops_per_token"] / 1e6, ".2f"),
                    _fmt(v["fewer_denoise_flops_than_reference"], ".2f"),
                    _fmt(v["tokens_per_s"], ".1f"),
                ]
            )
        lines += _rows(rows)
        lines += [f"  {name}: {VARIANT_HELP[name]}" for name in e["variants"]]

    comparisons = result.get("compare")
    if comparisons:
        lines += ["", "Comparison (same weights, prompt and step count; 'x' = how many times faster mlx_diffgemma is)"]
        rows = [["implementation", "step s", "x", "prompt tok/s", "x", "end-to-end tok/s", "x"]]
        rows.append(
            [
                "mlx_diffgemma",
                _fmt(g["step_time_s"], ".3f"),
                "",
                _fmt(g["prompt_tps"], ".1f"),
                "",
                _fmt(g["end_to_end_tps"], ".2f"),
                "",
            ]
        )
        for key in ("transformers", "mlx-vlm"):
            c = comparisons.get(key)
            if c:
                rows.append(
                    [
                        c["implementation"],
                        _fmt(c["step_time_s"], ".3f"),
                        _fmt(c["ours_faster_step"], ".2f"),
                        _fmt(c["prompt_tps"], ".1f"),
                        _fmt(c.get("ours_faster_prompt"), ".2f"),
                        _fmt(c["end_to_end_tps"], ".2f"),
                        _fmt(c["ours_faster_end_to_end"], ".2f"),
                    ]
                )
        lines += _rows(rows)
        ar = comparisons.get("ar")
        if ar:
            lines += ["", f"Autoregressive: {ar['implementation']}"]
            lines += _rows(
                [
                    ["time per token (one forward)", f"{_fmt(ar['token_time_s'], '.4f')} s", ""],
                    [
                        "decode tokens/s",
                        _fmt(ar["generation_tps"], ".2f"),
                        f"(mlx_diffgemma {_fmt(g['generation_tps'], '.2f')}: "
                        f"x{_fmt(ar['ours_faster_generation'], '.2f')})",
                    ],
                    [
                        "end-to-end tokens/s",
                        _fmt(ar["end_to_end_tps"], ".2f"),
                        f"(mlx_diffgemma {_fmt(g['end_to_end_tps'], '.2f')}: "
                        f"x{_fmt(ar['ours_faster_end_to_end'], '.2f')})",
                    ],
                    ["prompt tok/s", _fmt(ar["prompt_tps"], ".1f"), f"(x{_fmt(ar['ours_faster_prompt'], '.2f')})"],
                    [
                        "break-even tokens per forward",
                        _fmt(ar["break_even_tokens_per_forward"], ".1f"),
                        f"(diffusion step / AR token time; we commit {_fmt(g['tokens_per_forward'], '.1f')})",
                    ],
                ]
            )
    return "\n".join(lines)
