"""xMSDA: fast multi-scale deformable attention for PyTorch, forward and backward."""

from . import reference
from .ops import ms_deform_attn, ms_deform_attn_offsets

__all__ = ["ms_deform_attn", "ms_deform_attn_offsets", "reference"]
__version__ = "0.1.0"
