"""Make Hugging Face transformers' deformable-attention models use the xmsda op.

    import xmsda.integrations.transformers as xt; xt.enable()

Deformable DETR and the models that copy its attention (Grounding DINO, MM Grounding DINO, OmDet-Turbo, RT-DETR,
RF-DETR, LW-DETR, PP-DocLayout v2-v4) compute it in a `MultiScaleDeformableAttention` layer: the layer that
transformers' hub-kernel mechanism (`use_kernel_forward_from_hub("MultiScaleDeformableAttention")`) also swaps. Its
forward takes (value, spatial shapes, their list, level start index, locations, weights, im2col_step) and has no
parameters, so `enable` replaces that forward on each model's class: existing and future instances switch, weights
and state dicts are untouched. `disable` restores the originals.
"""

from __future__ import annotations

import importlib

from ..ops import ms_deform_attn

__all__ = ["MODELS", "disable", "enable", "enabled"]

# transformers.models.<name>.modeling_<name> modules that define MultiScaleDeformableAttention.
MODELS = (
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

_originals: dict[type, object] = {}


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


def _layer_classes(models):
    for name in models:
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        cls = getattr(module, "MultiScaleDeformableAttention", None)
        if cls is not None:
            yield cls


def enable(models=MODELS) -> list[type]:
    """Route the listed models' MultiScaleDeformableAttention through xmsda. Returns the classes switched."""
    switched = []
    for cls in _layer_classes(models):
        if cls not in _originals:
            _originals[cls] = cls.forward
            cls.forward = _xmsda_forward
        switched.append(cls)
    return switched


def disable() -> None:
    """Restore transformers' own forward everywhere `enable` replaced it."""
    while _originals:
        cls, forward = _originals.popitem()
        cls.forward = forward


def enabled() -> bool:
    """Whether `enable` has switched any class (and `disable` has not restored it yet)."""
    return bool(_originals)
