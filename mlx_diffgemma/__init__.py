"""Run Google's DiffusionGemma with MLX."""

import _thread
import sys
import time
from pathlib import Path


def _quiet_interrupt(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        return  # Python still exits as interrupted (status 130), with no traceback
    previous(kind, value, traceback)


def _interrupt_again(unraisable, previous=sys.unraisablehook):
    # Ctrl-C inside a finalizer (a library's __del__ while imports run) is
    # "ignored" with a traceback and the command runs on; deliver it again,
    # a moment later from another thread so that it lands after this hook
    # returns, where it stops the command as any Ctrl-C does.
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _thread.start_new_thread(_interrupt_later, ())
        return
    previous(unraisable)


def _interrupt_later():
    time.sleep(0.05)
    _thread.interrupt_main()


# Ctrl-C in a command's first seconds lands in the imports below, before the
# command's own handler (cli.run) is there. Only for our commands: an app that
# imports the package keeps its own hook. ("-m" is argv[0] while `python -m
# mlx_diffgemma.X` imports this package.)
_script = Path(sys.argv[0] if sys.argv else "").name
if sys.argv[:1] == ["-m"] or _script == "mlx_diffgemma" or _script.startswith("mlx_diffgemma."):
    sys.excepthook = _quiet_interrupt
    sys.unraisablehook = _interrupt_again

# ``python -m mlx_diffgemma.edit``'s package first: it shares its name with the
# function exported below, and a submodule imported for the first time later
# would rebind the package's name to itself (``import mlx_diffgemma.edit`` would
# turn ``mlx_diffgemma.edit`` into a module).
from . import edit as _edit_command  # noqa: F401
from .chat import chat, stream_chat
from .convert import convert
from .fuse import fuse
from .generate import generate, stream_generate
from .infill import edit, infill, stream_edit, stream_infill
from .sampler_params import FAST, SamplerParams
from .utils import load

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "chat",
    "stream_chat",
    "infill",
    "stream_infill",
    "edit",
    "stream_edit",
    "convert",
    "fuse",
    "SamplerParams",
    "FAST",
]
__version__ = "0.1.0"
