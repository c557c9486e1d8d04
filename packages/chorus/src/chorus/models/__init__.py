"""Model adapters: the diffusers video pipelines Chorus serves (one module per family) and the built-in model, behind
one interface (`base.FlowVideoDiTAdapter`); `loading` picks the family, `device` the device, dtype and threads."""

from .base import FlowVideoDiTAdapter, ModelDefaults, PromptEmbeds
from .codecs import PixelCodec, WanVAECodec
from .loading import BUILTIN_DIR, BUILTIN_NAME, ModelNotFoundError, adapter_from_wan_pipeline, load_adapter

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_NAME",
    "FlowVideoDiTAdapter",
    "ModelDefaults",
    "ModelNotFoundError",
    "PixelCodec",
    "PromptEmbeds",
    "WanVAECodec",
    "adapter_from_wan_pipeline",
    "load_adapter",
]
