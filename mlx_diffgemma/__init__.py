"""Run Google's DiffusionGemma with MLX."""

import sys
import warnings
from pathlib import Path


def _quiet_interrupt(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        return  # Python still exits as interrupted (status 130), with no traceback
    previous(kind, value, traceback)


# Ctrl-C in a command's first seconds lands in the imports below, before the
# command's own handler (cli.run) is there. Only for our commands: an app that
# imports the package keeps its own hook. ("-m" is argv[0] while `python -m
# mlx_diffgemma.X` imports this package.)
_script = Path(sys.argv[0] if sys.argv else "").name
if sys.argv[:1] == ["-m"] or _script == "mlx_diffgemma" or _script.startswith("mlx_diffgemma."):
    sys.excepthook = _quiet_interrupt

# The command-line stubs first: each shares its name with a function exported
# below, and importing a submodule later would rebind the package's name to it
# (``import mlx_diffgemma.edit`` would turn ``mlx_diffgemma.edit`` into a module).
from . import edit as _edit_command  # noqa: F401
from .chat import chat, stream_chat
from .convert import convert
from .fuse import fuse
from .generate import generate, stream_generate
from .infill import edit, infill, stream_edit, stream_infill
from .sampler_params import FAST, SamplerParams
from .utils import load

# The functions above share their modules' names (as in mlx-lm), so
# `python -m mlx_diffgemma.generate` finds its module already imported by this
# package; runpy warns about that, harmlessly: the command runs its own copy.
warnings.filterwarnings(
    "ignore",
    message=r".*found in sys.modules after import of package 'mlx_diffgemma'",
    category=RuntimeWarning,
)

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
