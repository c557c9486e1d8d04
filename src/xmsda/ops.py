"""`ms_deform_attn`: multi-scale deformable attention as a PyTorch custom op.

The op (`torch.ops.xmsda.ms_deform_attn`) has a fake implementation, so torch.compile and torch.export trace through
it, and autograd through a second op for the backward. CPU tensors run the fused numba kernels; float16 and bfloat16
are computed in float32 and returned in their own dtype. Tensors on other devices run the grid_sample reference
until a kernel for them exists.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .kernels import cpu as cpu_kernels
from .reference import ms_deform_attn_core_pytorch

__all__ = ["ms_deform_attn"]

_FLOAT_INPUTS = ("value", "sampling_locations", "attention_weights")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Deformable DETR's `MSDeformAttnFunction`).

    Args:
        value: `[N, S, M, D]`, S = sum over levels of H*W.
        spatial_shapes: `[L, 2]` integer (H, W) of each level.
        level_start_index: `[L]` integer offset of each level in S.
        sampling_locations: `[N, Q, M, L, P, 2]` normalised to [0, 1], last dim (x, y).
        attention_weights: `[N, Q, M, L, P]`.

    Returns:
        `[N, Q, M*D]` in the dtype of `value`.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.device.type != "cpu":  # no kernel yet: plain autograd through the reference
        _warn_reference(value.device)
        shapes, _ = _levels(value, spatial_shapes, level_start_index)
        return ms_deform_attn_core_pytorch(value, shapes.tolist(), sampling_locations, attention_weights)
    return torch.ops.xmsda.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _shape_error(name, expected, tensor):
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Ranks, shapes, dtypes and devices (everything that does not need the values of the index tensors)."""
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in args.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise _shape_error("value", "[N, S, M, D] (4 dims)", value)
    N, _, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise _shape_error("spatial_shapes", "[L, 2] (H, W per level)", spatial_shapes)
    L = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        raise _shape_error("level_start_index", f"[L] with L={L} from spatial_shapes", level_start_index)
    if sampling_locations.dim() != 6:
        raise _shape_error("sampling_locations", "[N, Q, M, L, P, 2] (6 dims)", sampling_locations)
    _, Q, _, _, P, _ = sampling_locations.shape
    expected = (N, Q, M, L, P, 2)
    if tuple(sampling_locations.shape) != expected:
        raise _shape_error("sampling_locations", f"[N, Q, M, L, P, 2] = {list(expected)}", sampling_locations)
    if tuple(attention_weights.shape) != expected[:5]:
        raise _shape_error("attention_weights", f"[N, Q, M, L, P] = {list(expected[:5])}", attention_weights)
    if D > cpu_kernels.MAX_CHANNELS:
        raise _shape_error("value", f"[N, S, M, D] with D <= {cpu_kernels.MAX_CHANNELS}", value)
    if 2 * L * P > cpu_kernels.MAX_CHANNELS:
        raise _shape_error(
            "sampling_locations", f"[N, Q, M, L, P, 2] with L*P <= {cpu_kernels.MAX_CHANNELS // 2}", sampling_locations
        )
    for name in _FLOAT_INPUTS:
        if not args[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {args[name].dtype}")
    dtypes = {name: args[name].dtype for name in _FLOAT_INPUTS}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"value, sampling_locations and attention_weights must share one dtype, got {dtypes}")
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].is_floating_point() or args[name].is_complex() or args[name].dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {args[name].dtype}")
    devices = {name: t.device for name, t in args.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _check_levels(spatial_shapes: np.ndarray, level_start_index: np.ndarray, S: int):
    """The checks that need the values of the index tensors; run where they are on the host anyway."""
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


def _levels(value, spatial_shapes, level_start_index):
    shapes = spatial_shapes.detach().to("cpu", torch.int64).numpy()
    starts = level_start_index.detach().to("cpu", torch.int64).numpy()
    _check_levels(shapes, starts, value.shape[1])
    return shapes, starts


def _new_tensor(*shape, dtype, zeroed=False):
    """A CPU tensor on memory from NumPy's allocator, which advises the kernel to back large arrays with transparent
    huge pages: a fresh 45 MB output then takes ~20 page faults instead of ~11,000 (allocating and filling one took
    2.7 ms instead of 11 ms on this repository's machine). A zeroed one is filled by torch's threads up front:
    calloc'd pages would instead fault one by one inside the kernel (detr-decoder backward 8.3 vs 15 ms)."""
    tensor = torch.from_numpy(np.empty(shape, np.float64 if dtype == torch.float64 else np.float32))
    return tensor.zero_() if zeroed else tensor


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_warned_device = False


def _warn_reference(device):
    global _warned_device
    if not _warned_device:
        _warned_device = True
        warnings.warn(
            f"xmsda has no kernel for {device.type} tensors yet; using the grid_sample reference",
            RuntimeWarning,
            stacklevel=3,
        )


@torch.library.custom_op("xmsda::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    # Checked here too: callers of torch.ops.xmsda.* skip the wrapper, and the kernels trust these bounds.
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    shapes, starts = _levels(value, spatial_shapes, level_start_index)
    if value.device.type != "cpu":
        _warn_reference(value.device)
        return ms_deform_attn_core_pytorch(value, shapes.tolist(), sampling_locations, attention_weights)
    N, _, M, D = value.shape
    ct = _compute_dtype(value.dtype)
    v, loc, attn = (t.detach().to(ct).contiguous() for t in (value, sampling_locations, attention_weights))
    out = _new_tensor(N, loc.shape[1], M, D, dtype=ct)
    order = cpu_kernels.query_order(loc.numpy(), shapes)
    cpu_kernels.forward(v.numpy(), shapes, starts, loc.numpy(), attn.numpy(), order, out.numpy())
    return out.view(N, loc.shape[1], M * D).to(value.dtype)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("xmsda::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    if tuple(grad_output.shape) != (N, sampling_locations.shape[1], M * D):
        raise _shape_error("grad_output", f"[N, Q, M*D] = {[N, sampling_locations.shape[1], M * D]}", grad_output)
    shapes, starts = _levels(value, spatial_shapes, level_start_index)
    if value.device.type != "cpu":
        _warn_reference(value.device)
        # autograd is switched off inside a custom op; torch.func's vjp differentiates regardless
        hw = shapes.tolist()
        _, vjp = torch.func.vjp(
            lambda v, loc, attn: ms_deform_attn_core_pytorch(v, hw, loc, attn),
            value.detach(),
            sampling_locations.detach(),
            attention_weights.detach(),
        )
        return vjp(grad_output)
    Q = sampling_locations.shape[1]
    ct = _compute_dtype(value.dtype)
    v, loc, attn = (t.detach().to(ct).contiguous() for t in (value, sampling_locations, attention_weights))
    grad_out = grad_output.detach().reshape(N, Q, M, D).to(ct).contiguous()
    grad_value = _new_tensor(*v.shape, dtype=ct, zeroed=True)
    grad_loc = _new_tensor(*loc.shape, dtype=ct)
    grad_attn = _new_tensor(*attn.shape, dtype=ct)
    cpu_kernels.backward_kernel(
        v.numpy(),
        shapes,
        starts,
        loc.numpy(),
        attn.numpy(),
        cpu_kernels.query_order(loc.numpy(), shapes),
        grad_out.numpy(),
        grad_value.numpy(),
        grad_loc.numpy(),
        grad_attn.numpy(),
    )
    return grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype), grad_attn.to(attention_weights.dtype)


@_ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.xmsda.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_loc if needs[3] else None,
        grad_attn if needs[4] else None,
    )


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
