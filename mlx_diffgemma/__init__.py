"""Run Google's DiffusionGemma with MLX."""

from .utils import load

__all__ = ["load"]
__version__ = "0.1.0"
