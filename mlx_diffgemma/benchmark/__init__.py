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

from . import common
from .breakdown import COMPONENT_NAMES, COMPONENTS, run_breakdown
from .compare import COMPARISONS
from .machine import load_average, machine_info
from .presets import PRESETS, quantize, random_model, random_prompts, write_hf_checkpoint
from .report import format_report
from .runner import Options, run_benchmark, run_evaluation, run_generation, sampler_overrides, validate
from .work import VARIANTS, evaluate, generation_flops, read_problems

__all__ = [
    "common",
    "COMPARISONS",
    "COMPONENT_NAMES",
    "COMPONENTS",
    "evaluate",
    "generation_flops",
    "read_problems",
    "run_breakdown",
    "VARIANTS",
    "format_report",
    "load_average",
    "machine_info",
    "Options",
    "PRESETS",
    "quantize",
    "random_model",
    "random_prompts",
    "run_benchmark",
    "run_evaluation",
    "run_generation",
    "sampler_overrides",
    "validate",
    "write_hf_checkpoint",
]
