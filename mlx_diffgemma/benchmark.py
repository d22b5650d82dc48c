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

import argparse
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import sampler
from .config import DEFAULT_ROPE, ModelArgs
from .generate import PREFILL_STEP, SamplerParams, _denoise_rows, _self_conditioning, encode_prompt, stream_generate
from .cache import PromptCache
from .convert import DEFAULT_RECIPE, module_quantization, quantization_settings
from .model import Model

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

COMPARISONS = ("transformers", "mlx-vlm", "ar")


# Adaptive stopping off: no canvas' mean entropy is ever below this.
NEVER_CONFIDENT = 1e-30


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


# ---------------------------------------------------------------------------
# The machine.


def _cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.check_output(
                ["sysctl", "-n", "machdep.cpu.brand_string"], text=True
            ).strip()
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


def _blas() -> str:
    """The BLAS MLX's CPU backend calls: Accelerate on a Mac; on Linux the
    wheel's own unless one is preloaded (then its symbols win)."""
    if sys.platform == "darwin":
        return "Accelerate"
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "blas" in p.lower()]
    if not preloaded:
        return "MLX's bundled BLAS (nothing preloaded)"
    # Name the library behind the preloaded libblas.so.3 (e.g. libopenblasp-r0.3.21.so),
    # read from this process' memory map.
    directory = str(Path(preloaded[0]).resolve().parent)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    behind = sorted({Path(line.split()[-1]).name for line in maps
                     if line.split()[-1].startswith(directory) and "openblas" in line})
    return f"preloaded {preloaded[0]}" + (f" ({', '.join(behind)})" if behind else "")


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
        blas=_blas(),
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


def set_dtype(model: nn.Module, dtype: mx.Dtype):
    model.set_dtype(dtype)
    # MLX's CPU backend has gather_mm for float32 only (Metal runs any float),
    # so on CPU the unquantized experts stay in float32, as `load` keeps them.
    if mx.default_device().type == mx.DeviceType.cpu and dtype != mx.float32:
        for _, module in model.named_modules():
            if type(module).__name__ == "SwitchLinear":
                module.weight = module.weight.astype(mx.float32)
    mx.eval(model.parameters())


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


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _global_attention_fields(text: dict) -> dict:
    """global_head_dim / num_global_key_value_heads, also when written as per_layer_config.

    transformers >= 5.2x writes the full layers' head dim and KV heads as
    per_layer_config; mlx-vlm 0.7 and mlx-lm read only the older fields.
    """
    text = dict(text)
    for override in (text.get("per_layer_config") or {}).values():
        text.setdefault("global_head_dim", override.get("head_dim"))
        text.setdefault("num_global_key_value_heads", override.get("num_key_value_heads"))
    return text


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
# Timing helpers.


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of ``mx.eval(fn())`` for each function (building the
    graph is timed too), taking turns: one run of each per round.

    Other processes' load then weighs on all of them alike, so their times
    stay comparable (and the parts of a step keep summing to about the step).
    """
    for fn in fns.values():
        for _ in range(warmup):
            mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def step_intervals(marks: Sequence[Tuple[int, float]]) -> List[float]:
    """Durations of the steps after a canvas' first, from (canvas, end time) marks.

    A canvas' first step also pays for encoding the previous canvas (or the
    prompt) and has no self-conditioning, so it is left out.
    """
    return [
        t - t_prev
        for (c_prev, t_prev), (c, t) in zip(marks, marks[1:])
        if c == c_prev
    ]


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------
# Generation with our stream_generate.


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    return mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed)).tolist()


def sampler_overrides(fixed_steps: Optional[int], vocab: int) -> dict:
    """stream_generate settings: the checkpoint's, or fixed steps with stopping and EOS off."""
    if fixed_steps is None:
        return {}
    # An id outside the vocabulary is never generated, so no canvas ends early.
    return dict(
        max_denoising_steps=fixed_steps,
        confidence_threshold=NEVER_CONFIDENT,
        eos_token_id=[vocab],
    )


def run_generation(
    model: Model, prompts: List[List[int]], max_tokens: int, seed: int, overrides: dict, params: SamplerParams
) -> dict:
    """One timed generation (after a short warm-up), measured from its stream of responses."""
    batch = prompts if len(prompts) > 1 else prompts[0]
    warmup = dict(overrides, max_denoising_steps=min(2, params.max_denoising_steps))
    for _ in stream_generate(model, None, batch, max_tokens=model.canvas_length, seed=seed, **warmup):
        pass
    # MLX's buffer cache stays warm: clearing it would make the first timed
    # steps pay the operating system for fresh pages.
    gc.collect()
    mx.reset_peak_memory()

    marks = []  # (canvas index, time a step's responses arrived)
    last = {}
    steps_seen = 0
    tic = time.perf_counter()
    for response in stream_generate(model, None, batch, max_tokens=max_tokens, seed=seed, **overrides):
        now = time.perf_counter()
        # Every row reports each step; the first report of a new step count marks it.
        if response.denoising_steps > steps_seen:
            steps_seen = response.denoising_steps
            marks.append((response.canvas_index, now))
        last[response.row] = response
    total = time.perf_counter() - tic

    rows = [last[r] for r in sorted(last)]
    B, P = len(prompts), len(prompts[0])
    prompt_time = B * P / rows[0].prompt_tps
    steps = step_intervals(marks)
    if not steps and marks:
        # One step per canvas: estimate the first step from the prompt's end.
        steps = [marks[0][1] - tic - prompt_time]
    step_time = _median(steps)
    tokens = sum(r.generation_tokens for r in rows)
    canvases = marks[-1][0] + 1 if marks else 0
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
    )


# ---------------------------------------------------------------------------
# The per-step breakdown.

COMPONENTS = ("attention", "dense_mlp", "experts", "lm_head", "self_conditioning", "sampler")

COMPONENT_NAMES = {
    "attention": "attention (all layers)",
    "dense_mlp": "dense MLP",
    "experts": "experts (router + SwitchGLU)",
    "lm_head": "LM head",
    "self_conditioning": "self-conditioning",
    "sampler": "sampler + stop check",
    "remainder": "remainder (norms, embed, glue)",
}


class _Recorder(nn.Module):
    """Stands in for a submodule during one model call, keeping its calls.

    Anything but calling it is passed through to the real module.
    """

    def __init__(self, inner: nn.Module, calls: list):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, key):
        return getattr(object.__getattribute__(self, "_inner"), key)

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        self._calls.append((self._inner, args, kwargs, out))
        return out


@contextmanager
def recording(model: Model):
    """Record what each layer's attention, MLP, router and experts (and the
    model's self-conditioning block and final norm) receive in a call."""
    calls = {name: [] for name in ("self_attn", "mlp", "router", "experts", "self_conditioning", "norm")}
    swapped = []
    owners = [(layer, ("self_attn", "mlp", "router", "experts")) for layer in model.layers]
    owners.append((model, ("self_conditioning", "norm")))
    try:
        for owner, names in owners:
            for name in names:
                inner = getattr(owner, name)
                setattr(owner, name, _Recorder(inner, calls[name]))
                swapped.append((owner, name, inner))
        yield calls
    finally:
        for owner, name, inner in swapped:
            setattr(owner, name, inner)


def _arrays(tree) -> List[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    if isinstance(tree, dict):
        return [a for t in tree.values() for a in _arrays(t)]
    return []


def _uses_probs(model: Model) -> bool:
    """Whether a step hands the decoder its signal as probabilities (as generate does)."""
    return model.dtype == mx.float32


class Product(NamedTuple):
    """``count`` matrix products ``a @ b`` (``a @ b.T`` if ``transposed``: b is stored
    as [out, in], as Linear weights and cached keys are)."""

    a: tuple
    b: tuple
    count: int = 1
    transposed: bool = True

    @property
    def flops(self) -> int:
        out = self.b[-2] if self.transposed else self.b[-1]
        return 2 * math.prod(self.a) * out * self.count


def matmul_shapes(args: ModelArgs, batch: int, cache_len: int) -> Dict[str, List[Product]]:
    """The matrix products of one denoising step, per component.

    N = batch x canvas rows. Per layer: q/k/(v)/o projections and, per query
    head, scores q @ k^T and values p @ v over the K keys the canvas sees
    (cached keys, at most window - 1 on sliding layers, plus the canvas);
    grouped KV heads are counted once per query head, as computed. The experts
    are counted as their equal-FLOP dense products: top_k x N rows through one
    expert's gate, up and down. The self-conditioning rows are for a step that
    has a signal (every step but a canvas' first): probabilities [N, V] times
    the embedding [V, D], then its MLP.
    """
    C, D, H = args.canvas_length, args.hidden_size, args.num_attention_heads
    I, M, V = args.intermediate_size, args.moe_intermediate_size, args.vocab_size
    N = batch * C

    def mlp(rows, hidden):
        return [Product((rows, D), (hidden, D), 2), Product((rows, hidden), (D, hidden))]

    shapes = {name: [] for name in COMPONENTS}
    for i, kind in enumerate(args.layer_types):
        d, g = args.layer_head_dims[i], args.layer_kv_heads[i]
        sliding = kind == "sliding_attention"
        K = (min(cache_len, args.sliding_window - 1) if sliding else cache_len) + C
        shapes["attention"] += [
            Product((N, D), (H * d, D)),
            Product((N, D), (g * d, D), 2 if sliding else 1),  # k, and v on sliding layers
            Product((N, H * d), (D, H * d)),
            Product((batch, H, C, d), (batch, H, K, d)),  # scores
            Product((batch, H, C, K), (batch, H, K, d), transposed=False),  # values
        ]
        shapes["dense_mlp"] += mlp(N, I)
        shapes["experts"] += [Product((N, D), (args.num_experts, D))] + mlp(N * args.top_k_experts, M)
    shapes["lm_head"] = [Product((N, D), (V, D))]
    shapes["self_conditioning"] = [Product((N, V), (V, D), transposed=False)] + mlp(N, I)
    return shapes


def matmul_flops(shapes: List[Product]) -> int:
    return sum(p.flops for p in shapes)


def matmul_floor(shapes: List[Product], dtype: mx.Dtype) -> Callable[[], List[mx.array]]:
    """The products alone, as plain ``mx.matmul``s on random operands (made now)."""
    key = mx.random.key(0)
    operands = []
    for p in shapes:
        key, ka, kb = mx.random.split(key, 3)
        a = mx.random.normal(p.a, key=ka).astype(dtype)
        b = mx.random.normal(p.b, key=kb).astype(dtype)
        operands.append((a, mx.swapaxes(b, -1, -2) if p.transposed else b, p.count))
    mx.eval([(a, b) for a, b, _ in operands])
    return lambda: [mx.matmul(a, b) for a, b, count in operands for _ in range(count)]


@dataclass
class StepInputs:
    """What a canvas' second denoising step starts from: the prompt's cache,
    the canvas and self-conditioning signal the first step left."""

    cache: PromptCache
    canvas: mx.array
    signal: mx.array
    history: mx.array
    key: mx.array
    temperature: float


def _row_keys(key: mx.array, rows: int) -> List[mx.array]:
    return [key] if rows == 1 else list(mx.random.split(key, rows))


def prepare_step(model: Model, prompts: List[List[int]], params: SamplerParams, seed: int) -> StepInputs:
    cache = model.make_cache()
    encode_prompt(model, prompts, cache)
    N = params.max_denoising_steps
    noise_key, first_key, key = mx.random.split(mx.random.key(seed), 3)
    canvas = sampler.initial_canvas(noise_key, len(prompts), model.canvas_length, model.args.vocab_size)
    processed = model.denoise(canvas, cache) / params.temperature(N)
    first = _denoise_rows(processed, params.entropy_bound, _row_keys(first_key, len(prompts)))
    signal = first.probs if _uses_probs(model) else processed.astype(model.dtype)
    history = sampler.empty_argmax_history(params.stability_threshold, len(prompts), model.canvas_length)
    _, history = sampler.stable_and_confident(first.argmax_canvas, history, first.entropy, params.confidence_threshold)
    mx.eval(first.next_canvas, signal, history)
    return StepInputs(cache, first.next_canvas, signal, history, key, params.temperature(max(N - 1, 1)))


def step_functions(model: Model, step: StepInputs, params: SamplerParams) -> Dict[str, Optional[Callable]]:
    """The whole step and each part of it, as functions returning what they compute.

    The parts run on what their submodules received in one real call of the
    decoder; a part whose submodule was not called maps to None.
    """
    sc_kwargs = _self_conditioning(step.signal, _uses_probs(model))

    def sampler_part(logits):
        processed = logits / step.temperature
        # Row by row, each on its own key, as stream_generate samples a batch.
        update = _denoise_rows(processed, params.entropy_bound, _row_keys(step.key, step.canvas.shape[0]))
        stop, history = sampler.stable_and_confident(
            update.argmax_canvas, step.history, update.entropy, params.confidence_threshold
        )
        next_signal = update.probs if _uses_probs(model) else processed.astype(model.dtype)
        return [update.next_canvas, update.argmax_canvas, next_signal, stop, history]

    with recording(model) as calls:
        logits = model.denoise(step.canvas, step.cache, **sc_kwargs)
        mx.eval(logits, _arrays([c[1:] for name in calls for c in calls[name]]))

    def replay(*names):
        if not calls[names[-1]]:
            return None
        return lambda: [inner(*a, **kw) for name in names for inner, a, kw, _ in calls[name]]

    def self_conditioning_part():
        (block, (embeds, _), _, _), = calls["self_conditioning"]
        # With a float32 model the decoder gets the sampler's probabilities;
        # otherwise it takes the softmax of the processed logits itself.
        probs = step.signal if _uses_probs(model) else mx.softmax(step.signal.astype(mx.float32), axis=-1)
        return block(embeds, model.soft_embedding(probs))

    # The LM head's input is the final norm's output (its values do not change its cost).
    final_hidden = calls["norm"][-1][3] if calls["norm"] else mx.zeros((*step.canvas.shape, model.args.hidden_size), model.dtype)
    return {
        "step": lambda: sampler_part(model.denoise(step.canvas, step.cache, **sc_kwargs)),
        "attention": replay("self_attn"),
        "dense_mlp": replay("mlp"),
        "experts": replay("router", "experts"),
        "lm_head": lambda: model.logits(final_hidden),
        "self_conditioning": self_conditioning_part if calls["self_conditioning"] else None,
        "sampler": lambda: sampler_part(logits),
    }


def run_breakdown(model: Model, prompts: List[List[int]], params: SamplerParams, repeats: int, seed: int) -> dict:
    """Time a real denoising step, each of its parts on the step's own inputs,
    and the same step's matrix products alone."""
    step = prepare_step(model, prompts, params, seed)
    functions = step_functions(model, step, params)
    shapes = matmul_shapes(model.args, len(prompts), step.cache.offset)
    # Quantized weights leave the norms in the float dtype the products run in.
    floors = {f"floor/{name}": matmul_floor(shapes[name], model.dtype) for name in COMPONENTS if shapes[name]}
    times = interleaved_medians({**{k: f for k, f in functions.items() if f}, **floors}, repeats)
    del floors
    mx.clear_cache()

    step_time = times["step"]
    components = {}
    for name in COMPONENTS:
        seconds = times.get(name)
        flops = matmul_flops(shapes[name])
        floor = times.get(f"floor/{name}", 0.0)
        components[name] = dict(
            time_s=seconds,
            share=seconds / step_time if seconds is not None else None,
            gflop=flops / 1e9,
            gflops_per_s=flops / seconds / 1e9 if seconds and flops else None,
            floor_s=floor,
            over_floor=seconds / floor if seconds and floor else None,
        )
    rest = step_time - sum(c["time_s"] for c in components.values() if c["time_s"] is not None)
    components["remainder"] = dict(
        time_s=rest, share=rest / step_time, gflop=0.0, gflops_per_s=None, floor_s=0.0, over_floor=None
    )
    floor_total = sum(c["floor_s"] for c in components.values())
    flops_total = sum(c["gflop"] for c in components.values())
    return dict(
        step_time_s=step_time,
        cache_length=step.cache.offset,
        repeats=repeats,
        self_conditioning_from="sampler probabilities" if _uses_probs(model) else "processed logits (softmax counted here)",
        components=components,
        gflop=flops_total,
        gflops_per_s=flops_total / step_time,
        matmul_floor_s=floor_total,
        step_over_floor=step_time / floor_total if floor_total else None,
        not_called=[name for name in COMPONENTS if functions[name] is None],
    )


# ---------------------------------------------------------------------------
# Comparisons, on the same checkpoint and settings.


def _speedup(theirs: Optional[float], ours: Optional[float]) -> Optional[float]:
    """How many times faster we are: their time / our time (or our rate / theirs)."""
    if not theirs or not ours:
        return None
    return theirs / ours


def compare_transformers(path: Path, prompts, max_tokens: int, params: SamplerParams, ours: dict) -> dict:
    """The reference, DiffusionGemmaForBlockDiffusion.generate on torch CPU."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()
    vocab = model.config.text_config.vocab_size

    class StepClock:
        """generate() calls put() with the prompt and each committed canvas,
        put_draft() after every denoising step; hooks on the encoder time its
        calls, the first of which encodes the prompt."""

        def __init__(self):
            self.start, self.canvas, self.marks, self.encodes = None, 0, [], []

        def put(self, value):
            if self.start is None:
                self.start = time.perf_counter()
            else:
                self.canvas += 1

        def encoder_starts(self, *_):
            self.encodes.append(time.perf_counter())

        def encoder_ends(self, *_):
            self.encodes[-1] = time.perf_counter() - self.encodes[-1]

        def put_draft(self, value=None, logits=None):
            self.marks.append((self.canvas, time.perf_counter()))

        def end(self):
            pass

    def generate(steps, new_tokens, clock=None):
        kwargs = dict(
            max_new_tokens=new_tokens, max_denoising_steps=steps, t_min=params.t_min, t_max=params.t_max,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=params.entropy_bound),
            confidence_threshold=NEVER_CONFIDENT, stability_threshold=params.stability_threshold,
            eos_token_id=[vocab], pad_token_id=0, streamer=clock,
        )
        with torch.inference_mode():
            return model.generate(torch.tensor(prompts), **kwargs)

    C = model.config.canvas_length
    generate(1, C)  # warm-up
    clock = StepClock()
    hooks = [model.model.encoder.register_forward_pre_hook(clock.encoder_starts),
             model.model.encoder.register_forward_hook(clock.encoder_ends)]
    tic = time.perf_counter()
    out = generate(params.max_denoising_steps, max_tokens, clock)
    total = time.perf_counter() - tic
    for hook in hooks:
        hook.remove()
    sequences = out.sequences if hasattr(out, "sequences") else out
    tokens = len(prompts) * min(sequences.shape[1] - len(prompts[0]), max_tokens)
    steps = step_intervals(clock.marks)
    step_time = _median(steps)
    prompt_time = clock.encodes[0] if clock.encodes else None
    result = dict(
        implementation=f"transformers {_version('transformers')} (torch {torch.__version__} CPU, {threads} threads)",
        step_time_s=step_time,
        step_times_s=steps,
        prompt_time_s=prompt_time,
        prompt_tps=len(prompts) * len(prompts[0]) / prompt_time if prompt_time and prompt_time > 0 else None,
        generation_tokens=tokens,
        end_to_end_time_s=total,
        end_to_end_tps=tokens / total,
    )
    del model
    gc.collect()
    return _with_ratios(result, ours)


def _with_ratios(result: dict, ours: dict) -> dict:
    result["ours_faster_step"] = _speedup(result.get("step_time_s"), ours["step_time_s"])
    result["ours_faster_end_to_end"] = _speedup(ours["end_to_end_tps"], result.get("end_to_end_tps"))
    if result.get("prompt_tps"):
        result["ours_faster_prompt"] = _speedup(ours["prompt_tps"], result["prompt_tps"])
    return result


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _mlx_vlm_checkpoint(path: Path, into: Path) -> Path:
    """``path`` as mlx-vlm can read it: config.json with the older global-attention fields."""
    config = json.loads((path / "config.json").read_text())
    config["text_config"] = _global_attention_fields(config["text_config"])
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(config))
    for item in path.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), into / item.name)
    return into


def compare_mlx_vlm(path: Path, prompts, max_tokens: int, params: SamplerParams, dtype: Optional[mx.Dtype], ours: dict) -> dict:
    """mlx-vlm's DiffusionGemma, stepped through its model methods and sampler functions.

    Its own generate loop needs a tokenizer; this is that loop's entropy-bound
    branch (sampling at temperature 1 from the scheduled logits, as the
    reference does) without detokenizing, and with full canvases as ours (by
    default mlx-vlm shortens the last canvas to what is left, at least 64).
    """
    from mlx_vlm.generate import diffusion as vlm
    from mlx_vlm.utils import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(_mlx_vlm_checkpoint(path, Path(tmp) / "mlx-vlm"))
    if dtype is not None:
        set_dtype(model, dtype)
    C = model.config.canvas_length
    V = model.config.text_config.vocab_size
    ids = mx.array(prompts)
    B, P = ids.shape
    N = params.max_denoising_steps
    stopping = dict(stability_threshold=params.stability_threshold, confidence_threshold=NEVER_CONFIDENT)
    schedule = dict(t_min=params.t_min, t_max=params.t_max)

    def generate(steps, new_tokens):
        marks = []
        tic = time.perf_counter()
        cache = model.diffusion_prefill_cache(
            ids, attention_mask=None, cache=model.make_cache(), pixel_values=None,
            mm_token_type_ids=None, prefill_step_size=PREFILL_STEP, chunk_prefill=P > PREFILL_STEP,
        )
        mx.eval([c.state for c in cache])
        prompt_time = time.perf_counter() - tic
        context = model.diffusion_prepare_self_conditioning()
        committed = 0
        argmax = None
        for index in range(math.ceil(new_tokens / C)):
            if argmax is not None:
                cache = model.diffusion_update_cache(argmax, cache=cache)
            canvas = vlm._diffusion_initialize_canvas(B, C, V, mx.int32)
            masks = model.diffusion_decoder_masks(canvas, cache, None)
            signal, history = None, []
            for step in range(steps, 0, -1):
                logits = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=signal, decoder_attention_mask=masks)
                processed = logits / vlm._diffusion_linear_temperature(step, steps, schedule)
                argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
                if step == 1:  # mlx-vlm's last step only takes the argmax
                    mx.eval(argmax)
                    marks.append((index, time.perf_counter()))
                    break
                sampled = vlm._diffusion_sample_canvas(processed, mx.int32, 1.0)
                entropy = vlm._diffusion_token_entropy(processed)
                next_signal = model.diffusion_self_conditioning(processed, context)
                accept = vlm._diffusion_entropy_transfer_mask(entropy, params.entropy_bound)
                accepted = mx.where(accept, sampled, canvas)
                canvas = mx.where(accept, accepted, vlm._diffusion_initialize_canvas(B, C, V, mx.int32))
                if vlm._diffusion_stable_and_confident(argmax, processed, history, stopping):
                    break
                signal = next_signal
                mx.eval(canvas, argmax, signal)
                marks.append((index, time.perf_counter()))
            argmax.tolist()
            committed += min(C, new_tokens - committed)
        return prompt_time, marks, time.perf_counter() - tic, committed * B

    generate(min(2, N), C)  # warm-up
    # MLX's buffer cache stays warm: clearing it would make the first timed
    # steps pay the operating system for fresh pages.
    gc.collect()
    mx.reset_peak_memory()
    prompt_time, marks, total, tokens = generate(N, max_tokens)
    # Full steps only: each canvas' last step takes just the argmax, so its
    # mark is dropped (with N <= 2 no full step is left to time).
    steps = step_intervals([m for i, m in enumerate(marks) if i + 1 < len(marks) and marks[i + 1][0] == m[0]])
    result = dict(
        implementation=f"mlx-vlm {_version('mlx-vlm')}",
        step_time_s=_median(steps),
        step_times_s=steps,
        prompt_time_s=prompt_time,
        prompt_tps=B * P / prompt_time,
        generation_tokens=tokens,
        end_to_end_time_s=total,
        end_to_end_tps=tokens / total,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    del model
    gc.collect()
    mx.clear_cache()
    return _with_ratios(result, ours)


def compare_autoregressive(config: dict, prompts, max_tokens: int, dtype: Optional[mx.Dtype], seed: int, ours: dict) -> dict:
    """Gemma 4 MoE with the same widths decoding one token per forward through mlx-lm."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models import gemma4_text

    if len(prompts) != 1:
        raise ValueError("--compare ar runs batch size 1 only")
    text = _global_attention_fields(config["text_config"])
    text.update(
        model_type="gemma4_text", enable_moe_block=True, attention_k_eq_v=True,
        num_kv_shared_layers=0, hidden_size_per_layer_input=0,
    )
    mx.random.seed(seed)
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text))
    if dtype is not None:
        set_dtype(model, dtype)
    mx.eval(model.parameters())
    prompt = mx.array(prompts[0])

    def generate(new_tokens):
        marks = []
        tic = time.perf_counter()
        for _ in generate_step(prompt, model, max_tokens=new_tokens):
            marks.append(time.perf_counter())
        return tic, marks

    generate(4)  # warm-up
    # MLX's buffer cache stays warm: clearing it would make the first timed
    # steps pay the operating system for fresh pages.
    gc.collect()
    mx.reset_peak_memory()
    tic, marks = generate(max_tokens)
    per_token = [b - a for a, b in zip(marks, marks[1:])]
    token_time = _median(per_token)
    decode_tps = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else None
    result = dict(
        implementation=f"autoregressive Gemma 4 MoE, mlx-lm {_version('mlx-lm')} (gemma4_text)",
        token_time_s=token_time,
        # The first token comes with the prompt's forward pass.
        prompt_time_s=marks[0] - tic,
        prompt_tps=len(prompts[0]) / (marks[0] - tic),
        generation_tokens=len(marks),
        generation_tps=decode_tps,
        end_to_end_time_s=marks[-1] - tic,
        end_to_end_tps=len(marks) / (marks[-1] - tic),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        weights_gb=weight_bytes(model) / 1e9,
    )
    # Diffusion beats one token per forward when each step commits more
    # tokens than the forwards autoregression fits in a step's time.
    result["break_even_tokens_per_forward"] = ours["step_time_s"] / token_time if token_time else None
    result["ours_faster_generation"] = _speedup(ours["generation_tps"], decode_tps)
    result["ours_faster_end_to_end"] = _speedup(ours["end_to_end_tps"], result["end_to_end_tps"])
    result["ours_faster_prompt"] = _speedup(ours["prompt_tps"], result["prompt_tps"])
    del model
    gc.collect()
    mx.clear_cache()
    return result


# ---------------------------------------------------------------------------
# Putting it together.


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


def _validate(options: Options):
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


def _load_or_build(options: Options, checkpoint: Optional[Path]) -> Tuple[Model, dict, str]:
    """Our model, its config dict, and where it came from."""
    if checkpoint is not None:
        from .utils import load

        model, _ = load(str(checkpoint))
        config = json.loads((checkpoint / "config.json").read_text())
        source = options.model or f"preset {options.preset!r} (random weights, via a transformers checkpoint)"
        return model, config, source
    config = copy.deepcopy(PRESETS[options.preset])
    return random_model(config, options.seed), config, f"preset {options.preset!r} (random weights)"


def run_benchmark(options: Options) -> dict:
    """Everything the command reports, as a JSON-ready dict."""
    _validate(options)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="mlx_diffgemma_bench_") as tmp:
        checkpoint = Path(options.model).expanduser() if options.model else None
        if options.model and not checkpoint.exists():
            from .utils import get_model_path

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
    model, config, source = _load_or_build(options, checkpoint)
    dtype = getattr(mx, options.dtype) if options.dtype else None
    if dtype is not None:
        set_dtype(model, dtype)
    quantization = quantize(model, options.bits, options.group_size, options.recipe) if options.bits else None

    args = model.args
    prompts = random_prompts(options.batch_size, options.prompt_tokens, args.vocab_size, options.seed)
    overrides = sampler_overrides(options.fixed_steps, args.vocab_size)
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
            mode=f"{options.fixed_steps} fixed steps (stopping and EOS off)" if options.fixed_steps
            else "checkpoint sampler (adaptive stopping)",
            sampler={k: v for k, v in asdict(params).items() if k != "eos_token_id"},
            seed=options.seed,
        ),
    )

    _log("Timing generation...")
    result["generation"] = run_generation(model, prompts, options.max_tokens, options.seed, overrides, params)
    if options.breakdown:
        _log("Timing the parts of one denoising step...")
        result["breakdown"] = run_breakdown(model, prompts, params, options.repeats, options.seed)
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
    line = f"Load average (1 min): {start:.2f} before the run, {_fmt(end, '.2f')} after it (the run itself adds up to {machine['cores']})"
    if start > 0.5:
        line += "; the machine was busy in the minute before (an earlier run, or other processes, which would inflate these timings)"
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
    lines += _rows([
        ["prompt encode", f"{_fmt(g['prompt_tps'], '.1f')} tok/s", f"({_fmt(g['prompt_time_s'], '.3f')} s)"],
        ["denoising step (median)", f"{_fmt(g['step_time_s'], '.3f')} s", f"({len(g['step_times_s'])} steps timed)"],
        ["denoising steps per canvas", _fmt(g["steps_per_canvas"], ".1f"), f"({g['denoising_steps']} steps, {g['canvases']} canvas{'es' if g['canvases'] != 1 else ''})"],
        ["tokens per forward", _fmt(g["tokens_per_forward"], ".2f"), ""],
        ["committed tokens/s", _fmt(g["generation_tps"], ".2f"), f"({g['generation_tokens']} tokens; {_fmt(g['end_to_end_tps'], '.2f')} end to end)"],
        ["canvas positions/s", _fmt(g["canvas_positions_per_s"], ".1f"), "(batch x canvas / step time)"],
        ["peak memory", _fmt_bytes(g["peak_memory_gb"]), ""],
    ])

    b = result.get("breakdown")
    if b:
        lines += ["", f"One denoising step, by part (median of {b['repeats']}; cache {b['cache_length']} tokens; "
                      f"self-conditioning from {b['self_conditioning_from']})"]
        rows = [["part", "ms", "share", "GFLOP", "GFLOP/s", "matmul floor ms", "x floor"]]
        for name in COMPONENTS + ("remainder",):
            c = b["components"][name]
            rows.append([
                COMPONENT_NAMES[name],
                _fmt(c["time_s"] and c["time_s"] * 1e3, ".1f"),
                _fmt(c["share"] and c["share"] * 100, ".1f", "%"),
                _fmt(c["gflop"] or None, ".2f"),
                _fmt(c["gflops_per_s"], ".1f"),
                _fmt(c["floor_s"] * 1e3 if c["floor_s"] else None, ".1f"),
                _fmt(c["over_floor"], ".1f"),
            ])
        rows.append(["whole step", _fmt(b["step_time_s"] * 1e3, ".1f"), "100%", _fmt(b["gflop"], ".2f"),
                     _fmt(b["gflops_per_s"], ".1f"), _fmt(b["matmul_floor_s"] * 1e3, ".1f"), _fmt(b["step_over_floor"], ".1f")])
        lines += _rows(rows)
        if b["not_called"]:
            lines.append(f"  (not called as a submodule, so not timed: {', '.join(b['not_called'])})")

    comparisons = result.get("compare")
    if comparisons:
        lines += ["", "Comparison (same weights, prompt and step count; 'x' = how many times faster mlx_diffgemma is)"]
        rows = [["implementation", "step s", "x", "prompt tok/s", "x", "end-to-end tok/s", "x"]]
        rows.append(["mlx_diffgemma", _fmt(g["step_time_s"], ".3f"), "", _fmt(g["prompt_tps"], ".1f"), "",
                     _fmt(g["end_to_end_tps"], ".2f"), ""])
        for key in ("transformers", "mlx-vlm"):
            c = comparisons.get(key)
            if c:
                rows.append([c["implementation"], _fmt(c["step_time_s"], ".3f"), _fmt(c["ours_faster_step"], ".2f"),
                             _fmt(c["prompt_tps"], ".1f"),
                             _fmt(c.get("ours_faster_prompt"), ".2f"),
                             _fmt(c["end_to_end_tps"], ".2f"), _fmt(c["ours_faster_end_to_end"], ".2f")])
        lines += _rows(rows)
        ar = comparisons.get("ar")
        if ar:
            lines += ["", f"Autoregressive: {ar['implementation']}"]
            lines += _rows([
                ["time per token (one forward)", f"{_fmt(ar['token_time_s'], '.4f')} s", ""],
                ["decode tokens/s", _fmt(ar["generation_tps"], ".2f"),
                 f"(mlx_diffgemma {_fmt(g['generation_tps'], '.2f')}: x{_fmt(ar['ours_faster_generation'], '.2f')})"],
                ["end-to-end tokens/s", _fmt(ar["end_to_end_tps"], ".2f"),
                 f"(mlx_diffgemma {_fmt(g['end_to_end_tps'], '.2f')}: x{_fmt(ar['ours_faster_end_to_end'], '.2f')})"],
                ["prompt tok/s", _fmt(ar["prompt_tps"], ".1f"), f"(x{_fmt(ar['ours_faster_prompt'], '.2f')})"],
                ["break-even tokens per forward", _fmt(ar["break_even_tokens_per_forward"], ".1f"),
                 f"(diffusion step / AR token time; we commit {_fmt(g['tokens_per_forward'], '.1f')})"],
            ])
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_diffgemma.benchmark",
        description="Benchmark DiffusionGemma generation with MLX. On Linux, preload "
        "OpenBLAS for MLX's CPU backend: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="random-weight model to build (default: tiny); ignored with --model")
    parser.add_argument("--model", default=None, help="checkpoint directory or Hub repo to load instead")
    parser.add_argument("--prompt-tokens", "-p", type=int, default=512, help="prompt length (default 512)")
    parser.add_argument("--max-tokens", "-g", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--batch-size", "-b", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument("--fixed-steps", type=int, default=None, metavar="N",
                        help="N denoising steps per canvas, adaptive stopping and EOS off "
                        "(default: the checkpoint's sampler)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the weights (default: presets float32, checkpoints as stored)")
    parser.add_argument("--bits", type=int, default=None, help="quantize the weights to this many bits")
    parser.add_argument("--group-size", type=int, default=None, help="quantization group size")
    parser.add_argument("--recipe", default=None, help="which modules to quantize (mlx_diffgemma.convert's recipes)")
    parser.add_argument("--breakdown", action="store_true", help="time each part of a denoising step")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per breakdown timing (default 5)")
    parser.add_argument("--compare", nargs="+", action="extend", default=[], choices=COMPARISONS,
                        help="also run transformers, mlx-vlm and/or autoregressive mlx-lm (needs --fixed-steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("table", "json"), default="table", help="what to print")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("format", "json")}
    options = Options(**fields)
    try:
        result = run_benchmark(options)
    except ValueError as e:
        setup_arg_parser().error(str(e))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))


if __name__ == "__main__":
    main()
