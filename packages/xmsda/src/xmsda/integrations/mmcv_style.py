"""Drop-ins for the two functions through which mmcv-style code computes multi-scale deformable attention.

Deformable DETR's `models/ops` and the code that copies it (DINO, Mask2Former, detrex, mmcv and mmdet, ultralytics'
RT-DETR, ...) call the attention through one of two names, so assigning one of these in the caller's module switches
it to the xmsda op (the README has the line for each):

- `multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights)`: the
  grid_sample formulation, which these codebases run on the CPU (Deformable DETR's `ms_deform_attn_core_pytorch`);
- `MultiScaleDeformableAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights, im2col_step)`: the autograd Function of their CUDA extension (Deformable DETR's
  `MSDeformAttnFunction`), which has no CPU kernel.

Both are differentiable like the op. The callers' dtypes must agree, as for the op: mmcv's Function casts the
locations to value's dtype, which in half precision moves a point by up to a third of a pixel, so mixed dtypes are
refused here instead (under `torch.autocast` the op takes float32 inputs anyway).
"""

from __future__ import annotations

import torch

from ..ops import ms_deform_attn

__all__ = ["MultiScaleDeformableAttnFunction", "multi_scale_deformable_attn_pytorch"]


def multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """The op with the grid_sample function's arguments: value `[N, S, M, D]`; the (H, W) of each level as an
    `[L, 2]` tensor or a list of pairs; locations `[N, Q, M, L, P, 2]` and weights `[N, Q, M, L, P]`, or with the levels
    and points folded into one axis of L*P (`[N, Q, M, L*P, 2]` and `[N, Q, M, L*P]`, as ultralytics passes them).
    Returns `[N, Q, M*D]`."""
    shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.int64, device=value.device).reshape(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if sampling_locations.dim() == 5:
        sampling_locations, attention_weights = _unfold_levels(sampling_locations, attention_weights, len(shapes))
    return ms_deform_attn(value, shapes, level_start_index, sampling_locations, attention_weights)


def _unfold_levels(sampling_locations, attention_weights, levels):
    """`[N, Q, M, L*P, 2]` locations and `[N, Q, M, L*P]` weights as `[N, Q, M, L, P, 2]` and `[N, Q, M, L, P]`."""
    N, Q, M, points, coordinates = sampling_locations.shape
    if coordinates != 2 or points % levels:
        raise ValueError(
            f"sampling_locations: expected [N, Q, M, L*P, 2] with L*P a multiple of the L={levels} levels in "
            f"value_spatial_shapes, got {list(sampling_locations.shape)}"
        )
    if attention_weights.shape != (N, Q, M, points):
        raise ValueError(
            f"attention_weights: expected [N, Q, M, L*P] = {[N, Q, M, points]} to match sampling_locations, got "
            f"{list(attention_weights.shape)}"
        )
    P = points // levels
    return sampling_locations.reshape(N, Q, M, levels, P, 2), attention_weights.reshape(N, Q, M, levels, P)


class MultiScaleDeformableAttnFunction:
    """Stands where code calls mmcv's or Deformable DETR's autograd Function (`MSDeformAttnFunction`): `apply` takes
    their arguments and returns the op's output, which autograd differentiates through the op's own backward.
    `im2col_step` (their CUDA kernel's batch chunking) is accepted and ignored: the CPU kernels have no such step."""

    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
