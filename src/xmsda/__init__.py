"""xMSDA: fast multi-scale deformable attention for PyTorch, forward and backward."""

__version__ = "0.1.0"
