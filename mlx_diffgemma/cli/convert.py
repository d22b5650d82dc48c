"""python -m mlx_diffgemma.convert: Hub (or local) weights -> an MLX model, optionally quantized."""

import argparse
import signal

from ..convert import DTYPES, convert
from ..recipes import RECIPES
from ..utils import DEFAULT_MODEL, MODES
from . import ArgumentParser, prog, run


def configure_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog("convert", "python -m mlx_diffgemma.convert"),
        description=(
            "Convert DiffusionGemma from the Hugging Face Hub (or a local directory) to "
            "MLX, optionally quantized. Converts tensor by tensor: memory stays well "
            "below the checkpoint's size."
        ),
    )
    parser.add_argument(
        "--hf-path",
        "--model",
        default=DEFAULT_MODEL,
        help=f"Local directory or Hub id of the source model (default: {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--mlx-path",
        default=None,
        help="Output directory (default: the source name with the bits or dtype, e.g. diffusiongemma-26B-A4B-it-4bit).",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Quantize (implied by any of --q-bits, --q-group-size, --q-mode, --recipe).",
    )
    parser.add_argument(
        "--q-bits",
        type=int,
        choices=sorted({b for m in MODES.values() for b in m["bits"]}),
        default=None,
        help="Bits per weight for the experts (and, with --recipe uniform, everything). "
        "Default: 4 (8 for mxfp8). affine takes any; mxfp4 and nvfp4 take 4, mxfp8 8.",
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        default=None,
        metavar="N",
        help="Weights sharing one scale. Default: 64 for affine (which takes 32, 64, 128), "
        "32 for mxfp4/mxfp8, 16 for nvfp4 (each takes only its default).",
    )
    parser.add_argument(
        "--q-mode",
        choices=tuple(MODES),
        default=None,
        help="Quantization format: affine (scale and bias per group; default), or the "
        "floating-point formats mxfp4, mxfp8, nvfp4.",
    )
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="What is quantized how. mixed (default): experts at --q-bits; embedding, "
        "attention, dense MLP and self-conditioning at 8-bit; router in --dtype. uniform: "
        "everything at --q-bits. experts-only: experts at --q-bits, the rest in --dtype. "
        "Norms and scalars are never quantized.",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="Type of the unquantized weights and of the affine scales (default: the source config's dtype).",
    )
    parser.add_argument(
        "-d",
        "--dequantize",
        action="store_true",
        help="Turn an MLX-quantized DiffusionGemma (ours or mlx-vlm's) back into float.",
    )
    parser.add_argument(
        "--text-only",
        action="store_true",
        help="Leave the vision tower out (1.15 GB of the released model in bf16): a model that reads text only.",
    )
    parser.add_argument("--upload-repo", default=None, help="Hugging Face repo to upload the converted model to.")
    parser.add_argument(
        "--force", action="store_true", help="Replace an existing --mlx-path (once the new model is complete)."
    )
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = configure_parser().parse_args(argv)
    # A plain `kill` also goes through the cleanup of the partial output.
    signal.signal(signal.SIGTERM, _interrupt)
    run(lambda: convert(**vars(args)) and None, interrupted="interrupted: nothing was written to the output path")


if __name__ == "__main__":
    main()
