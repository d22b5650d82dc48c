"""Run Google's DiffusionGemma with MLX."""

from .chat import chat, stream_chat
from .generate import generate, stream_generate
from .utils import load

__all__ = ["load", "generate", "stream_generate", "chat", "stream_chat"]
__version__ = "0.1.0"
