"""python -m mlx_diffgemma.fuse: merge trained adapters into a model directory."""

from .. import cli
from ..fuse import fuse

INTERRUPTED = "fuse interrupted; nothing was written"


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog=cli.prog("fuse", "mlx_diffgemma.fuse"),
        description="Merge adapters trained by mlx_diffgemma.lora into a model directory.",
    )
    parser.add_argument(
        "--model", required=True, metavar="PATH_OR_REPO", help="The model the adapters were trained on."
    )
    parser.add_argument("--adapter-path", default="adapters", metavar="DIR", help="The adapters (default adapters).")
    parser.add_argument(
        "--save-path", default="fused_model", metavar="DIR", help="Where to write (default fused_model)."
    )
    parser.add_argument("--force", action="store_true", help="Replace --save-path if it is a model directory.")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)

    def run():
        out = fuse(args.model, args.adapter_path, args.save_path, force=args.force)
        print(f"Fused model written to {out}")

    # The model is written in a staging directory that an interrupt removes.
    cli.run(run, interrupted=INTERRUPTED)


if __name__ == "__main__":
    main()
