"""Make Hugging Face transformers' deformable-attention models use the xmsda op.

    import xmsda.integrations.transformers as xt; xt.enable()

transformers computes multi-scale deformable attention in two kinds of place, and `enable` switches both:

- A `MultiScaleDeformableAttention` layer, in Deformable DETR and the models that copy its attention (Grounding DINO,
  MM Grounding DINO, OmDet-Turbo, RT-DETR, RF-DETR, LW-DETR, PP-DocLayout v2-v4): the layer that transformers'
  hub-kernel mechanism (`use_kernel_forward_from_hub("MultiScaleDeformableAttention")`) also swaps. Its forward takes
  (value, spatial shapes, their list, level start index, locations, weights, im2col_step) and has no parameters, so
  `enable` replaces that forward on each model's class.
- A module-level function `multi_scale_deformable_attention(value, spatial_shapes_list, locations, weights)`, which
  the pixel decoders of Mask2Former and OneFormer call by its global name: `enable` replaces it in their modules with
  `mmcv_style.multi_scale_deformable_attn_pytorch`, which takes the same arguments.

Existing and future instances switch, weights and state dicts are untouched; `disable` restores the originals. (RT-DETR
v2, D-FINE and DEIMv2 run a different attention, with per-level point counts and a discrete sampling mode, which the op
does not compute: they keep their own.)
"""

from __future__ import annotations

import importlib

from ..ops import ms_deform_attn
from .mmcv_style import multi_scale_deformable_attn_pytorch

__all__ = ["FUNCTION_MODELS", "LAYER_MODELS", "MODELS", "attention_sites", "disable", "enable", "enabled"]

# transformers.models.<name>.modeling_<name> modules that define a MultiScaleDeformableAttention layer
LAYER_MODELS = (
    "deformable_detr",
    "grounding_dino",
    "mm_grounding_dino",
    "omdet_turbo",
    "rt_detr",
    "rf_detr",
    "lw_detr",
    "pp_doclayout_v2",
    "pp_doclayout_v3",
    "pp_doclayout_v4",
)
# ... and those that define the function multi_scale_deformable_attention
FUNCTION_MODELS = ("mask2former", "oneformer")
MODELS = LAYER_MODELS + FUNCTION_MODELS

LAYER = "MultiScaleDeformableAttention"
FUNCTION = "multi_scale_deformable_attention"

_originals: dict[tuple[object, str], object] = {}


def _xmsda_forward(
    self,
    value,
    value_spatial_shapes,
    value_spatial_shapes_list,
    level_start_index,
    sampling_locations,
    attention_weights,
    im2col_step,
):
    return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def attention_sites(models=MODELS) -> list[tuple[object, str]]:
    """Where the listed models compute the attention, as (owner, attribute) pairs: (layer class, "forward") or (module,
    FUNCTION). Models this transformers lacks are left out."""
    sites = []
    for name in models:
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        layer = getattr(module, LAYER, None)
        if isinstance(layer, type):
            sites.append((layer, "forward"))
        elif callable(getattr(module, FUNCTION, None)):
            sites.append((module, FUNCTION))
    return sites


def enable(models=MODELS) -> list[object]:
    """Route the listed models' deformable attention through xmsda. Returns the layer classes and modules switched."""
    switched = []
    for owner, attribute in attention_sites(models):
        if (owner, attribute) not in _originals:
            _originals[owner, attribute] = getattr(owner, attribute)
            setattr(owner, attribute, _xmsda_forward if attribute == "forward" else multi_scale_deformable_attn_pytorch)
        switched.append(owner)
    return switched


def disable() -> None:
    """Restore transformers' own attention everywhere `enable` replaced it."""
    while _originals:
        (owner, attribute), original = _originals.popitem()
        setattr(owner, attribute, original)


def enabled() -> bool:
    """Whether `enable` has switched anything (and `disable` has not restored it yet)."""
    return bool(_originals)
