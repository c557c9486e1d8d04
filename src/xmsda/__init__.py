"""xMSDA: fast multi-scale deformable attention for PyTorch, forward and backward."""

from . import reference
from .ops import ms_deform_attn

__all__ = ["ms_deform_attn", "reference"]
__version__ = "0.1.0"
