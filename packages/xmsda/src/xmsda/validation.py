"""Input checks of the ops, in one place: every backend trusts what passes them (the kernels index with these bounds).

`check_inputs` and `check_offset_inputs` need only the tensors' metadata (ranks, shapes, dtypes, devices), so they
also run on the fake tensors torch.compile traces with; `levels` checks the values of the index tensors, which it
copies to the host for the kernels anyway.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels.cpu import MAX_CHANNELS

__all__ = ["MAX_CHANNELS", "check_grad_output", "check_inputs", "check_offset_inputs", "levels"]


def shape_error(name, expected, tensor):
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def check_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, locations="sampling_locations"
):
    """Ranks, shapes, dtypes and devices (everything that does not need the values of the index tensors).
    `locations` names the fourth argument in messages."""
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        locations: sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in args.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise shape_error("value", "[N, S, M, D] (4 dims)", value)
    N, _, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise shape_error("spatial_shapes", "[L, 2] (H, W per level)", spatial_shapes)
    L = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        raise shape_error("level_start_index", f"[L] with L={L} from spatial_shapes", level_start_index)
    if sampling_locations.dim() != 6:
        raise shape_error(locations, "[N, Q, M, L, P, 2] (6 dims)", sampling_locations)
    _, Q, _, _, P, _ = sampling_locations.shape
    expected = (N, Q, M, L, P, 2)
    if tuple(sampling_locations.shape) != expected:
        raise shape_error(locations, f"[N, Q, M, L, P, 2] = {list(expected)}", sampling_locations)
    if tuple(attention_weights.shape) != expected[:5]:
        raise shape_error("attention_weights", f"[N, Q, M, L, P] = {list(expected[:5])}", attention_weights)
    if D > MAX_CHANNELS:
        raise shape_error("value", f"[N, S, M, D] with D <= {MAX_CHANNELS}", value)
    if 2 * L * P > MAX_CHANNELS:
        raise shape_error(locations, f"[N, Q, M, L, P, 2] with L*P <= {MAX_CHANNELS // 2}", sampling_locations)
    float_inputs = ("value", locations, "attention_weights")
    for name in float_inputs:
        if not args[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {args[name].dtype}")
    dtypes = {name: args[name].dtype for name in float_inputs}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"value, {locations} and attention_weights must share one dtype, got {dtypes}")
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].is_floating_point() or args[name].is_complex() or args[name].dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {args[name].dtype}")
    devices = {name: t.device for name, t in args.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def check_offset_inputs(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
):
    """`check_inputs` for `ms_deform_attn_offsets`, plus the reference points."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_weights, "sampling_offsets")
    if not isinstance(reference_points, torch.Tensor):
        raise TypeError(f"reference_points must be a torch.Tensor, got {type(reference_points).__name__}")
    N, Q, _, L, _, _ = sampling_offsets.shape
    if tuple(reference_points.shape) != (N, Q, L, 2):
        raise shape_error("reference_points", f"[N, Q, L, 2] = {[N, Q, L, 2]}", reference_points)
    if reference_points.dtype != value.dtype:
        raise TypeError(
            f"reference_points must have the dtype of value and sampling_offsets ({value.dtype}), "
            f"got {reference_points.dtype}"
        )
    if reference_points.device != value.device:
        raise ValueError(
            f"all inputs must be on one device, got value on {value.device}, "
            f"reference_points on {reference_points.device}"
        )


def check_grad_output(grad_output, value, loc):
    N, _, M, D = value.shape
    if tuple(grad_output.shape) != (N, loc.shape[1], M * D):
        raise shape_error("grad_output", f"[N, Q, M*D] = {[N, loc.shape[1], M * D]}", grad_output)


def _check_level_values(spatial_shapes: np.ndarray, level_start_index: np.ndarray, S: int):
    if (spatial_shapes <= 0).any():
        raise ValueError(f"spatial_shapes must be positive (H, W) pairs, got {spatial_shapes.tolist()}")
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    if int(sizes.sum()) != S:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} cover sum(H*W) = {int(sizes.sum())} positions but value has "
            f"S = {S} (value must have shape [N, S, M, D] with S = sum of H*W)"
        )
    expected = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if not np.array_equal(level_start_index, expected):
        raise ValueError(
            f"level_start_index must be the offsets of the levels in S, {expected.tolist()}, "
            f"got {level_start_index.tolist()}"
        )


def levels(value, spatial_shapes, level_start_index) -> tuple[np.ndarray, np.ndarray]:
    """The (H, W) of each level and their offsets in S as C-ordered int64 host arrays, checked against each other and
    value. C-ordered whatever the tensors' strides: numba compiles the CPU kernels apart for each array layout."""
    shapes = np.ascontiguousarray(spatial_shapes.detach().to("cpu", torch.int64).numpy())
    starts = np.ascontiguousarray(level_start_index.detach().to("cpu", torch.int64).numpy())
    _check_level_values(shapes, starts, value.shape[1])
    return shapes, starts
