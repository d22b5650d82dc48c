"""python -m mlx_diffgemma.benchmark: how fast generation runs here, and against what."""

import json
import os
from pathlib import Path

from .. import distributed
from ..benchmark import PRESETS, Options, format_report, run_benchmark, validate
from ..benchmark.compare import COMPARISONS
from ..benchmark.work import VARIANTS
from ..files import write_text
from ..recipes import RECIPES
from . import ArgumentParser, prog, quiet_stdout, run


def setup_arg_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog("benchmark", "python -m mlx_diffgemma.benchmark"),
        description="Benchmark DiffusionGemma generation with MLX. On Linux, preload "
        "OpenBLAS for MLX's CPU backend: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="random-weight model to build (default: tiny); ignored with --model",
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or Hub repo to load instead")
    parser.add_argument("--prompt-tokens", "-p", type=int, default=512, help="prompt length (default 512)")
    parser.add_argument("--max-tokens", "-g", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--batch-size", "-b", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument(
        "--fixed-steps",
        type=int,
        default=None,
        metavar="N",
        help="N denoising steps per canvas, adaptive stopping and EOS off (default: the checkpoint's sampler)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="cast the weights (default: presets float32, checkpoints as stored)",
    )
    parser.add_argument("--bits", type=int, default=None, help="quantize the weights to this many bits")
    parser.add_argument("--group-size", type=int, default=None, help="quantization group size")
    parser.add_argument(
        "--recipe",
        default=None,
        choices=tuple(RECIPES),
        help="which modules to quantize (mlx_diffgemma.convert's recipes)",
    )
    parser.add_argument("--breakdown", action="store_true", help="time each part of a denoising step")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per breakdown timing (default 5)")
    parser.add_argument(
        "--compare",
        nargs="+",
        action="extend",
        default=[],
        choices=COMPARISONS,
        help="also run transformers, mlx-vlm and/or autoregressive mlx-lm (needs --fixed-steps)",
    )
    parser.add_argument(
        "--self-conditioning-top-k",
        type=int,
        default=0,
        metavar="K",
        help="time steps that self-condition on the top K tokens (default 0: the whole vocabulary)",
    )
    parser.add_argument("--fast", action="store_true", help="time the fast setting instead of the reference sampler")
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="with --model: an evaluation set (jsonl of chat messages, or a directory with test.jsonl) "
        "to measure each variant's exact-match accuracy and work per committed token on",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of --data")
    parser.add_argument(
        "--variants",
        nargs="+",
        action="extend",
        default=[],
        choices=tuple(VARIANTS),
        help="sampler variants to evaluate with --data (default: all; the reference always)",
    )
    parser.add_argument(
        "--metric",
        default="exact",
        metavar="exact|FILE.py:FUNCTION",
        help="how --data's answers are scored: equal to the answer given (exact, the default), or by a "
        "task's check, FUNCTION(question, written, answer) -> a bool or a share 0-1, in FILE.py "
        "(examples/fill/build.py:check)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="with --data: also draw each variant's accuracy against its denoising FLOPs per token, "
        "as a PNG here (needs matplotlib)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: split the layers across the processes rather than every layer's heads and experts",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="what to print")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return parser


def _check_writable(path: Path):
    """Refuse a --json path that cannot be written before minutes of timing."""
    if path.is_dir():
        raise ValueError(f"--json {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"--json {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--json {path}: not writable")


def write_json(path: Path, result: dict):
    write_text(path, json.dumps(result, indent=2) + "\n")


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("format", "json")}
    options = Options(**fields)
    json_path = Path(args.json).expanduser() if args.json else None
    try:
        validate(options)
        if json_path is not None:
            _check_writable(json_path)
    except ValueError as e:
        parser.error(str(e))

    def body():
        if not distributed.is_primary():
            quiet_stdout()  # process 0 reports for the group
        result = run_benchmark(options)
        if json_path is not None and distributed.is_primary():
            write_json(json_path, result)
        print(json.dumps(result, indent=2) if args.format == "json" else format_report(result))

    run(body)


if __name__ == "__main__":
    main()
