"""Stage 2: recomputing only a region of the latent while the rest follows a cached source.

`bank` holds the features a request records (self-attention keys and values by step, branch and expert), `hooks`
installs the diffusers hooks that record them and that run region steps with TGAA, and one layout module per
transformer family (`wan`, `ltx`) is what they need to know about its attention. `flops` counts a transformer call.
"""

from .bank import BRANCHES, FeatureBank, FeatureKey
from .flops import transformer_flops
from .hooks import FeatureRecorder, RegionHooks, RunState, layout_for, region_support

__all__ = [
    "BRANCHES",
    "FeatureBank",
    "FeatureKey",
    "FeatureRecorder",
    "RegionHooks",
    "RunState",
    "layout_for",
    "region_support",
    "transformer_flops",
]
