"""The public ops: `ms_deform_attn` and `ms_deform_attn_offsets`.

Each is a family of `torch.library` custom ops (`family.py`) with a fake implementation (torch.compile and
torch.export trace through it), autograd to first and second order, and backends picked by device or by name
(`backends`): `cpu` (fused numba kernels), `triton` (CUDA), `reference` (grid_sample). float16 and bfloat16 are
computed in float32 and returned in their own dtype. Semantics, limits and backends: docs/xmsda/op.md.
"""

from __future__ import annotations

from .family import define_family
from .reference import locations_from_offsets, offset_normalizer
from .validation import check_inputs, check_offset_inputs

__all__ = ["locations_from_offsets", "ms_deform_attn", "ms_deform_attn_offsets", "offset_normalizer"]

LOCATIONS = define_family("ms_deform_attn", ("sampling_locations", "attention_weights"), check_inputs)
OFFSETS = define_family(
    "ms_deform_attn_offsets", ("reference_points", "sampling_offsets", "attention_weights"), check_offset_inputs
)


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, backend=None, deterministic=None
):
    """Multi-scale deformable attention (Deformable DETR's `MSDeformAttnFunction`).

    Args:
        value: `[N, S, M, D]`, S = sum over levels of H*W.
        spatial_shapes: `[L, 2]` integer (H, W) of each level.
        level_start_index: `[L]` integer offset of each level in S.
        sampling_locations: `[N, Q, M, L, P, 2]` normalised to [0, 1], last dim (x, y).
        attention_weights: `[N, Q, M, L, P]`.
        backend: None (by device: "cpu" for CPU tensors, "triton" for CUDA tensors), "cpu", "triton" or
            "reference"; a backend that cannot take the tensors raises ValueError.
        deterministic: whether the backward must give bit-identical gradients on every run (the Triton backend then
            avoids atomics); None follows `torch.use_deterministic_algorithms`.

    Returns:
        `[N, Q, M*D]` in the dtype of `value` (float32 under autocast, see `family.autocast_to_float32`).
    """
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return LOCATIONS(*tensors, backend=backend, deterministic=deterministic)


def ms_deform_attn_offsets(
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    sampling_offsets,
    attention_weights,
    *,
    backend=None,
    deterministic=None,
):
    """`ms_deform_attn` at the locations `reference_points + sampling_offsets / (W, H)` of each level, the way
    Deformable DETR's module computes them (same rounding), fused into the kernels.

    Args:
        value, spatial_shapes, level_start_index, attention_weights, backend, deterministic: as for
            `ms_deform_attn`.
        reference_points: `[N, Q, L, 2]` normalised (x, y) per query and level.
        sampling_offsets: `[N, Q, M, L, P, 2]` (x, y) offsets in pixels of each level.

    Returns:
        `[N, Q, M*D]` in the dtype of `value` (float32 under autocast); differentiable in value, reference_points,
        sampling_offsets and attention_weights.
    """
    tensors = (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
    return OFFSETS(*tensors, backend=backend, deterministic=deterministic)
