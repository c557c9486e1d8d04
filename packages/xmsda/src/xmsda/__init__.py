"""xMSDA: fast multi-scale deformable attention for PyTorch, forward and backward."""

from . import buffers, reference
from .ops import ms_deform_attn, ms_deform_attn_offsets

__all__ = ["buffers", "ms_deform_attn", "ms_deform_attn_offsets", "reference"]
__version__ = "0.1.0"
