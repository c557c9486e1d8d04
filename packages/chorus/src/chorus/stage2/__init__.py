"""Stage 2: recomputing only a region of the latent while the rest follows a cached source.

`bank` holds the features a request records (self-attention keys and values by step and branch), `hooks` installs
the diffusers hooks that record them and that run region steps with TGAA, `wan` is what they need to know about the
Wan transformer's attention.
"""

from .bank import BRANCHES, FeatureBank, FeatureKey
from .hooks import FeatureRecorder, RegionHooks, RunState
from .wan import transformer_flops

__all__ = ["BRANCHES", "FeatureBank", "FeatureKey", "FeatureRecorder", "RegionHooks", "RunState", "transformer_flops"]
