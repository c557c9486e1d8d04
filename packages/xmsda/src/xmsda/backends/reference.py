"""The `reference` backend: the grid_sample formulation (`xmsda.reference`) on any device, differentiated by torch.

It follows the kernels where grid_sample does not: a non-finite location samples nothing and gets zero gradients (as
in Deformable DETR's CUDA op), where grid_sample would return NaN. So the op gives the same results on every backend,
in a forked child that falls back to it, and in the double backward, which differentiates it.
"""

from __future__ import annotations

import torch

from ..reference import locations_from_offsets, ms_deform_attn_core_pytorch

NAME = "reference"


def unavailable(device: torch.device) -> str | None:
    """Why this backend cannot take tensors on `device` (never: grid_sample runs everywhere)."""
    return None


def core(value, levels, loc, ref, attn):
    """The reference at `loc` or, with reference points `ref`, at the locations made from the offsets `loc`."""
    if ref is not None:
        loc = locations_from_offsets(ref, loc, levels.spatial_shapes)
    loc = torch.where(loc.isfinite(), loc, -2.0)  # far outside every map: no corner inside
    return ms_deform_attn_core_pytorch(value, levels.shapes.tolist(), loc, attn)


def forward(value, levels, loc, ref, attn):
    return core(value, levels, loc, ref, attn)


def backward(grad_output, value, levels, loc, ref, attn, deterministic):
    """Gradients of value, `loc` and attention weights. Autograd is off inside a custom op; torch.func's vjp
    differentiates regardless. grid_sample's CUDA backward adds with atomics: no deterministic mode there (under
    torch.use_deterministic_algorithms grid_sample raises or warns itself; an explicit request is refused here)."""
    if deterministic and value.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        raise ValueError(
            "backend 'reference' has no deterministic backward for cuda tensors (grid_sample's adds with atomics): "
            "pick backend='triton', or deterministic=False"
        )
    _, vjp = torch.func.vjp(lambda v, lo, a: core(v, levels, lo, ref, a), value.detach(), loc.detach(), attn.detach())
    return vjp(grad_output)
