"""Run Google's DiffusionGemma with MLX."""

import _thread
import signal
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


_interrupted_while_importing = []


def _hold_interrupt(signum, frame):
    # An interrupt raised inside a C++ extension's call back into Python (torch,
    # which transformers imports when installed, is pybind11) escapes as a C++
    # exception and aborts the process (SIGABRT, "terminate called"): note it
    # and raise it once the imports are done.
    _interrupted_while_importing.append(signum)


# Ctrl-C in a command's first seconds lands in the imports below, before the
# command's own handler (cli.run) is there. Only for our commands: an app that
# imports the package keeps its own hook. ("-m" is argv[0] while `python -m
# mlx_diffgemma.X` imports this package.)
_script = Path(sys.argv[0] if sys.argv else "").name
if sys.argv[:1] == ["-m"] or _script == "mlx_diffgemma" or _script.startswith("mlx_diffgemma."):
    sys.excepthook = _quiet_interrupt
    sys.unraisablehook = _interrupt_again
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _hold_interrupt)

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

if signal.getsignal(signal.SIGINT) is _hold_interrupt:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted_while_importing:
        raise KeyboardInterrupt

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
