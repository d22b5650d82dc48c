"""Other implementations on the same checkpoint and settings: the transformers
reference, mlx-vlm, and autoregressive decoding of the same widths with mlx-lm.

torch, transformers and mlx-vlm are imported only when their comparison runs
(``require`` checks up front that they are installed).
"""

import gc
import importlib.util
import json
import math
import os
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma4_text

from ..prompts import PREFILL_STEP
from ..sampler_params import SamplerParams
from .common import NEVER_CONFIDENT, global_attention_fields, median, set_dtype, step_intervals, weight_bytes

# What each comparison imports, and the pip package that provides it.
NEEDS = {
    "transformers": [("torch", "torch==2.13.0"), ("transformers", "transformers==5.23.0")],
    "mlx-vlm": [("mlx_vlm", "mlx-vlm==0.7.10")],
    "ar": [],
}
COMPARISONS = tuple(NEEDS)


def require(comparisons) -> None:
    """Fail before any timing when a comparison's package is missing."""
    for name in comparisons:
        missing = [pip for module, pip in NEEDS[name] if importlib.util.find_spec(module) is None]
        if missing:
            raise ValueError(
                f"--compare {name} needs {', '.join(missing)}: pip install {' '.join(repr(m) for m in missing)}"
            )


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
            max_new_tokens=new_tokens,
            max_denoising_steps=steps,
            t_min=params.t_min,
            t_max=params.t_max,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=params.entropy_bound),
            confidence_threshold=NEVER_CONFIDENT,
            stability_threshold=params.stability_threshold,
            eos_token_id=[vocab],
            pad_token_id=0,
            streamer=clock,
        )
        with torch.inference_mode():
            return model.generate(torch.tensor(prompts), **kwargs)

    C = model.config.canvas_length
    generate(1, C)  # warm-up
    clock = StepClock()
    hooks = [
        model.model.encoder.register_forward_pre_hook(clock.encoder_starts),
        model.model.encoder.register_forward_hook(clock.encoder_ends),
    ]
    tic = time.perf_counter()
    out = generate(params.max_denoising_steps, max_tokens, clock)
    total = time.perf_counter() - tic
    for hook in hooks:
        hook.remove()
    sequences = out.sequences if hasattr(out, "sequences") else out
    tokens = len(prompts) * min(sequences.shape[1] - len(prompts[0]), max_tokens)
    steps = step_intervals(clock.marks)
    step_time = median(steps)
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
    model = None  # frees the weights before the next run (closures hold it too)
    gc.collect()
    return _with_ratios(result, ours)


def _with_ratios(result: dict, ours: dict) -> dict:
    result["ours_faster_step"] = _speedup(result.get("step_time_s"), ours["step_time_s"])
    result["ours_faster_end_to_end"] = _speedup(ours["end_to_end_tps"], result.get("end_to_end_tps"))
    if result.get("prompt_tps"):
        result["ours_faster_prompt"] = _speedup(ours["prompt_tps"], result["prompt_tps"])
    return result


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _mlx_vlm_checkpoint(path: Path, into: Path) -> Path:
    """``path`` as mlx-vlm can read it: config.json with the older global-attention fields."""
    config = json.loads((path / "config.json").read_text())
    config["text_config"] = global_attention_fields(config["text_config"])
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(config))
    for item in path.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), into / item.name)
    return into


def compare_mlx_vlm(
    path: Path, prompts, max_tokens: int, params: SamplerParams, dtype: Optional[mx.Dtype], ours: dict
) -> dict:
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
            ids,
            attention_mask=None,
            cache=model.make_cache(),
            pixel_values=None,
            mm_token_type_ids=None,
            prefill_step_size=PREFILL_STEP,
            chunk_prefill=P > PREFILL_STEP,
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
                logits = model.diffusion_decoder_logits(
                    canvas, cache=cache, self_conditioning=signal, decoder_attention_mask=masks
                )
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
        step_time_s=median(steps),
        step_times_s=steps,
        prompt_time_s=prompt_time,
        prompt_tps=B * P / prompt_time,
        generation_tokens=tokens,
        end_to_end_time_s=total,
        end_to_end_tps=tokens / total,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    model = None  # frees the weights before the next run (closures hold it too)
    gc.collect()
    mx.clear_cache()
    return _with_ratios(result, ours)


def compare_autoregressive(
    config: dict, prompts, max_tokens: int, dtype: Optional[mx.Dtype], seed: int, ours: dict
) -> dict:
    """Gemma 4 MoE with the same widths decoding one token per forward through mlx-lm."""
    if len(prompts) != 1:
        raise ValueError("--compare ar runs batch size 1 only")
    text = global_attention_fields(config["text_config"])
    text.update(
        model_type="gemma4_text",
        enable_moe_block=True,
        attention_k_eq_v=True,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
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
    token_time = median(per_token)
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
    step = ours["step_time_s"]
    result["break_even_tokens_per_forward"] = step / token_time if token_time and step else None
    result["ours_faster_generation"] = _speedup(ours["generation_tps"], decode_tps)
    result["ours_faster_end_to_end"] = _speedup(ours["end_to_end_tps"], result["end_to_end_tps"])
    result["ours_faster_prompt"] = _speedup(ours["prompt_tps"], result["prompt_tps"])
    model = None  # frees the weights before the next run (closures hold it too)
    gc.collect()
    mx.clear_cache()
    return result
