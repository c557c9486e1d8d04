"""Chorus: inter-request cache reuse for video diffusion transformer serving."""

__version__ = "0.1.0"
