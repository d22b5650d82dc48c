"""Run Google's DiffusionGemma with MLX."""

import warnings

from .chat import chat, stream_chat
from .convert import convert
from .generate import generate, stream_generate
from .utils import load

# The functions above share their modules' names (as in mlx-lm), so
# `python -m mlx_diffgemma.generate` finds its module already imported by this
# package; runpy warns about that, harmlessly: the command runs its own copy.
warnings.filterwarnings(
    "ignore",
    message=r".*found in sys.modules after import of package 'mlx_diffgemma'",
    category=RuntimeWarning,
)

__all__ = ["load", "generate", "stream_generate", "chat", "stream_chat", "convert"]
__version__ = "0.1.0"
