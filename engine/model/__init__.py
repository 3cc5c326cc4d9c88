"""DiffusionGemma text model in pure PyTorch (encoder and decoder modes on one weight stack)."""

from .transformer import DiffusionGemmaModel

__all__ = ["DiffusionGemmaModel"]
