"""``mlx_diffgemma <command>`` and ``python -m mlx_diffgemma <command>``: every
command behind one entry point, as ``mlx_lm <command>``.

The per-command forms (``mlx_diffgemma.generate``, ``python -m
mlx_diffgemma.generate``) stay; both run the same ``cli.<command>.main``.
"""

import importlib
import os
import sys

from .. import cli

COMMANDS = {
    "generate": "generate text from a prompt (or between a prompt and a --suffix)",
    "chat": "chat in the terminal",
    "edit": "rewrite spans of a file in place",
    "server": "serve the OpenAI API (and llama.cpp's /infill) over HTTP",
    "convert": "convert a checkpoint to MLX, optionally quantized",
    "benchmark": "time generation and its parts",
    "lora": "fine-tune with LoRA, DoRA or all weights",
    "fuse": "merge trained adapters into a model",
}


def usage(name: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {name} <command> [options]", "", "commands:"]
    lines += [f"  {command:<{width}}  {help}" for command, help in COMMANDS.items()]
    lines += ["", f"'{name} <command> --help' shows a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # Run as `python -m mlx_diffgemma`, argv[0] is this package's __main__.py.
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    name = "mlx_diffgemma" if script in ("", "__main__.py", "-m", "-c") else script
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(name))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{name}: error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    cli.DISPATCHER = name
    sys.argv = [f"{name} {command}", *rest]
    importlib.import_module(f"{__package__}.{command}").main()
