"""`ms_deform_attn`: multi-scale deformable attention as a PyTorch custom op.

The op (`torch.ops.xmsda.ms_deform_attn`) has a fake implementation, so torch.compile and torch.export trace through
it, and autograd through a second op for the backward (and a third for double backward, which runs the reference: see
"second-order gradients" below). CPU tensors run the fused numba kernels; float16 and bfloat16 are computed in float32
and returned in their own dtype. The kernels use `torch.get_num_threads()` threads. Tensors on other devices run the
grid_sample reference until a kernel for them exists.

`ms_deform_attn_offsets` is the same attention with the sampling locations given the way Deformable DETR's module
makes them, reference points plus offsets in pixels of each level, and computed inside the kernels: the module then
skips two passes over the `[N, Q, M, L, P, 2]` tensor forward (division, addition) and one backward.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numba
import numpy as np
import torch

from . import buffers
from .kernels import cpu as cpu_kernels
from .reference import ms_deform_attn_core_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_offsets"]


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Deformable DETR's `MSDeformAttnFunction`).

    Args:
        value: `[N, S, M, D]`, S = sum over levels of H*W.
        spatial_shapes: `[L, 2]` integer (H, W) of each level.
        level_start_index: `[L]` integer offset of each level in S.
        sampling_locations: `[N, Q, M, L, P, 2]` normalised to [0, 1], last dim (x, y).
        attention_weights: `[N, Q, M, L, P]`.

    Returns:
        `[N, Q, M*D]` in the dtype of `value` (float32 under autocast, see `_autocast_to_float32`).
    """
    value, sampling_locations, attention_weights = _autocast_to_float32(value, sampling_locations, attention_weights)
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.device.type != "cpu":  # no kernel yet: plain autograd through the reference
        _warn_reference(value.device)
        shapes, _ = _levels(value, spatial_shapes, level_start_index)
        return _reference_core(value, shapes, spatial_shapes, sampling_locations, None, attention_weights)
    return torch.ops.xmsda.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def ms_deform_attn_offsets(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
):
    """`ms_deform_attn` at the locations `reference_points + sampling_offsets / (W, H)` of each level, the way
    Deformable DETR's module computes them (same rounding), fused into the kernels.

    Args:
        value, spatial_shapes, level_start_index, attention_weights: as for `ms_deform_attn`.
        reference_points: `[N, Q, L, 2]` normalised (x, y) per query and level.
        sampling_offsets: `[N, Q, M, L, P, 2]` (x, y) offsets in pixels of each level.

    Returns:
        `[N, Q, M*D]` in the dtype of `value` (float32 under autocast); differentiable in value, reference_points,
        sampling_offsets and attention_weights.
    """
    value, reference_points, sampling_offsets, attention_weights = _autocast_to_float32(
        value, reference_points, sampling_offsets, attention_weights
    )
    check_offset_inputs(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
    if value.device.type != "cpu":
        _warn_reference(value.device)
        shapes, _ = _levels(value, spatial_shapes, level_start_index)
        return _reference_core(value, shapes, spatial_shapes, sampling_offsets, reference_points, attention_weights)
    return torch.ops.xmsda.ms_deform_attn_offsets(
        value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
    )


def _autocast_to_float32(*tensors):
    """Under autocast (torch.autocast on the tensors' device) the op runs on float32 inputs, as the registered ops do
    for callers of torch.ops (`register_autocast` below): autocast hands it bfloat16/float16 projections next to
    float32 reference points and locations, and locations need float32 anyway (in bfloat16 a location on a
    167-pixel-wide map is off by up to a third of a pixel). The output is float32; the next autocast op casts it."""
    device_type = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if not (device_type and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def offset_normalizer(spatial_shapes, dtype):
    """`[L, 2]` (W, H) of each level in `dtype`: Deformable DETR's `offset_normalizer`."""
    return torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(dtype)


def locations_from_offsets(reference_points, sampling_offsets, spatial_shapes):
    """Deformable DETR's `reference_points[:, :, None, :, None, :] + sampling_offsets / offset_normalizer[None, None,
    None, :, None, :]` in torch, with the same values bit for bit. The small operands are first expanded to a
    query-head's whole (L, P, 2) block: broadcasting inside that block left TensorIterator a 2-element inner loop
    (division 2.5x and addition 1.8x slower here). The normalizer is made float first: dividing by the integer tensor
    takes a slow mixed-dtype path."""
    N, Q, _, L, P, _ = sampling_offsets.shape
    normalizer = offset_normalizer(spatial_shapes, sampling_offsets.dtype)[:, None, :].expand(L, P, 2).contiguous()
    reference_block = reference_points[:, :, None, :, None, :].expand(N, Q, 1, L, P, 2).contiguous()
    return reference_block + sampling_offsets / normalizer


def _shape_error(name, expected, tensor):
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def check_offset_inputs(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
):
    """`check_inputs` for `ms_deform_attn_offsets`, plus the reference points."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_weights, "sampling_offsets")
    if not isinstance(reference_points, torch.Tensor):
        raise TypeError(f"reference_points must be a torch.Tensor, got {type(reference_points).__name__}")
    N, Q, _, L, _, _ = sampling_offsets.shape
    if tuple(reference_points.shape) != (N, Q, L, 2):
        raise _shape_error("reference_points", f"[N, Q, L, 2] = {[N, Q, L, 2]}", reference_points)
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
        raise _shape_error("value", "[N, S, M, D] (4 dims)", value)
    N, _, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise _shape_error("spatial_shapes", "[L, 2] (H, W per level)", spatial_shapes)
    L = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        raise _shape_error("level_start_index", f"[L] with L={L} from spatial_shapes", level_start_index)
    if sampling_locations.dim() != 6:
        raise _shape_error(locations, "[N, Q, M, L, P, 2] (6 dims)", sampling_locations)
    _, Q, _, _, P, _ = sampling_locations.shape
    expected = (N, Q, M, L, P, 2)
    if tuple(sampling_locations.shape) != expected:
        raise _shape_error(locations, f"[N, Q, M, L, P, 2] = {list(expected)}", sampling_locations)
    if tuple(attention_weights.shape) != expected[:5]:
        raise _shape_error("attention_weights", f"[N, Q, M, L, P] = {list(expected[:5])}", attention_weights)
    if D > cpu_kernels.MAX_CHANNELS:
        raise _shape_error("value", f"[N, S, M, D] with D <= {cpu_kernels.MAX_CHANNELS}", value)
    if 2 * L * P > cpu_kernels.MAX_CHANNELS:
        raise _shape_error(
            locations, f"[N, Q, M, L, P, 2] with L*P <= {cpu_kernels.MAX_CHANNELS // 2}", sampling_locations
        )
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
    # C-ordered whatever the tensors' strides: numba compiles the kernels apart for each array layout (~20 s of
    # compiling the forward, backward and query order for a new one).
    shapes = np.ascontiguousarray(spatial_shapes.detach().to("cpu", torch.int64).numpy())
    starts = np.ascontiguousarray(level_start_index.detach().to("cpu", torch.int64).numpy())
    _check_levels(shapes, starts, value.shape[1])
    return shapes, starts


def _new_tensor(*shape, dtype, zeroed=False):
    """An output or gradient buffer in the compute dtype `dtype`, from the ops' buffer cache (`xmsda.buffers`)."""
    return buffers.new_tensor(shape, np.float64 if dtype == torch.float64 else np.float32, zeroed)


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


# Set in a process forked after numba's OpenMP threads started: GNU OpenMP cannot run in such a child (numba
# terminates a child that launches a kernel), so the ops fall back to the reference there instead of dying.
_forked_from_openmp = False


def _note_fork() -> None:
    global _forked_from_openmp
    # threading_layer() raises ValueError while numba has run no parallel code: the child can start its own threads
    with contextlib.suppress(ValueError):
        _forked_from_openmp = _forked_from_openmp or numba.threading_layer() == "omp"


os.register_at_fork(after_in_child=_note_fork)
_warned_fork = False


def _kernels_unavailable(device) -> bool:
    """Whether the ops must run the grid_sample reference instead of the CPU kernels: tensors on another device (no
    kernel for them yet), or a process forked after numba's OpenMP threads started. Warns once per reason."""
    global _warned_fork
    if device.type != "cpu":
        _warn_reference(device)
        return True
    if _forked_from_openmp:
        if not _warned_fork:
            _warned_fork = True
            warnings.warn(
                "xmsda: this process was forked after numba's OpenMP threads had started, and GNU OpenMP cannot run "
                "in a forked child; using the grid_sample reference (slow). To keep the kernels, start worker "
                "processes with the 'spawn' or 'forkserver' method, or fork before the parent first runs the op, or "
                "give numba a fork-safe threading layer (NUMBA_THREADING_LAYER=tbb with the tbb package).",
                RuntimeWarning,
                stacklevel=4,
            )
        return True
    return False


@contextlib.contextmanager
def _torch_threads():
    """Run the kernels on as many threads as torch's intra-op pool (`torch.set_num_threads`), as torch's own CPU ops
    do: a process that limits torch (data-loader workers, several ranks or servers per machine) must not get a kernel
    on every core. numba's thread count is per calling thread and is restored afterwards."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _kernel_view(tensor):
    """A contiguous NumPy view of an input for the kernels, with no conversion: bfloat16 and float16 as their bits
    (uint16 and int16, which the kernels widen to float32 as they read them: `kernels.simd.real`); converting them
    to float32 first took the bfloat16 op on detr-encoder from ~55 to ~100 ms forward and from ~130 to ~200 ms
    backward (docs/xmsda.md, dtypes)."""
    tensor = tensor.detach().contiguous()
    bits = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}.get(tensor.dtype)
    return (tensor if bits is None else tensor.view(bits)).numpy()


def _kernel_inputs(value, loc, ref, attn):
    """The compute dtype and the kernels' views of the inputs; `ref` None means `loc` holds locations, else offsets
    from these reference points."""
    v, loc_, attn_ = (_kernel_view(t) for t in (value, loc, attn))
    return _compute_dtype(value.dtype), v, loc_, None if ref is None else _kernel_view(ref), attn_


def _cpu_forward(value, shapes, starts, loc, ref, attn):
    """The forward kernel (see `_kernel_inputs` for `loc` and `ref`), in float32 for half-precision inputs."""
    N, _, M, D = value.shape
    Q = loc.shape[1]
    ct, v, loc_, ref_, attn_ = _kernel_inputs(value, loc, ref, attn)
    out = _new_tensor(N, Q, M, D, dtype=ct)
    with _torch_threads():
        order = cpu_kernels.query_order(loc_, shapes, ref_)
        cpu_kernels.forward(v, shapes, starts, loc_, ref_, attn_, order, out.numpy())
    return out.view(N, Q, M * D).to(value.dtype)


def _cpu_backward(grad_output, value, shapes, starts, loc, ref, attn):
    """The backward kernel: gradients of value, `loc` (locations or, with `ref`, offsets) and attention weights."""
    N, _, M, D = value.shape
    Q = loc.shape[1]
    ct, v, loc_, ref_, attn_ = _kernel_inputs(value, loc, ref, attn)
    grad_out = _kernel_view(grad_output.reshape(N, Q, M, D))
    grad_value = _new_tensor(*v.shape, dtype=ct, zeroed=True)
    grad_loc = _new_tensor(*loc_.shape, dtype=ct)
    grad_attn = _new_tensor(*attn_.shape, dtype=ct)
    with _torch_threads():
        order = cpu_kernels.query_order(loc_, shapes, ref_)
        partition = cpu_kernels.backward_partition(N, len(shapes), M, numba.get_num_threads())
        cpu_kernels.backward_kernel(
            v,
            shapes,
            starts,
            loc_,
            ref_,
            attn_,
            order,
            grad_out,
            grad_value.numpy(),
            grad_loc.numpy(),
            grad_attn.numpy(),
            *partition,
        )
    return grad_value.to(value.dtype), grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)


def _reference_core(value, shapes, spatial_shapes, loc, ref, attn):
    """The grid_sample reference, at `loc` or (with `ref`) at the locations made from these offsets, with the
    kernels' semantics for a non-finite location: it samples nothing and gets zero gradients (as in Deformable DETR's
    CUDA op), where grid_sample would return NaN. So the ops agree wherever they run (another device, a forked
    child, the double backward)."""
    if ref is not None:
        loc = locations_from_offsets(ref, loc, spatial_shapes)
    loc = torch.where(loc.isfinite(), loc, -2.0)  # far outside every map: no corner inside
    return ms_deform_attn_core_pytorch(value, shapes.tolist(), loc, attn)


def _forward(value, spatial_shapes, level_start_index, loc, ref, attn):
    """Both forward ops once their inputs are checked: the CPU kernels, or the reference where they cannot run."""
    shapes, starts = _levels(value, spatial_shapes, level_start_index)
    if _kernels_unavailable(value.device):
        return _reference_core(value, shapes, spatial_shapes, loc, ref, attn)
    return _cpu_forward(value, shapes, starts, loc, ref, attn)


def _backward_op_body(grad_output, value, spatial_shapes, level_start_index, loc, ref, attn):
    """Both backward ops once their inputs are checked: gradients of value, `loc` and attention weights."""
    _check_grad_output(grad_output, value, loc)
    shapes, starts = _levels(value, spatial_shapes, level_start_index)
    if _kernels_unavailable(value.device):
        # autograd is switched off inside a custom op; torch.func's vjp differentiates regardless
        _, vjp = torch.func.vjp(
            lambda v, lo, a: _reference_core(v, shapes, spatial_shapes, lo, ref, a),
            value.detach(),
            loc.detach(),
            attn.detach(),
        )
        return vjp(grad_output)
    return _cpu_backward(grad_output, value, shapes, starts, loc, ref, attn)


def _check_grad_output(grad_output, value, loc):
    N, _, M, D = value.shape
    if tuple(grad_output.shape) != (N, loc.shape[1], M * D):
        raise _shape_error("grad_output", f"[N, Q, M*D] = {[N, loc.shape[1], M * D]}", grad_output)


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
    return _forward(value, spatial_shapes, level_start_index, sampling_locations, None, attention_weights)


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
    return _backward_op_body(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, None, attention_weights
    )


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


# ---- the same with locations from reference points and offsets ------------------------------------------------------


@torch.library.custom_op("xmsda::ms_deform_attn_offsets", mutates_args=())
def _ms_deform_attn_offsets_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    check_offset_inputs(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
    return _forward(value, spatial_shapes, level_start_index, sampling_offsets, reference_points, attention_weights)


@_ms_deform_attn_offsets_op.register_fake
def _(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_offsets.shape[1], M * D)


@torch.library.custom_op("xmsda::ms_deform_attn_offsets_backward", mutates_args=())
def _ms_deform_attn_offsets_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, sampling_offsets and attention_weights (the reference points' follows from the
    offsets': see `_offsets_backward`)."""
    check_offset_inputs(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
    return _backward_op_body(
        grad_output, value, spatial_shapes, level_start_index, sampling_offsets, reference_points, attention_weights
    )


@_ms_deform_attn_offsets_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_offsets), torch.empty_like(attention_weights)


def _offsets_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights = ctx.saved_tensors
    grad_value, grad_offsets, grad_attn = torch.ops.xmsda.ms_deform_attn_offsets_backward(
        grad_output, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
    )
    needs = ctx.needs_input_grad
    grad_reference = None
    if needs[3]:
        # location = reference + offset / (W, H): d/d(reference) is (W, H) times d/d(offset), summed over heads
        # and points
        normalizer = offset_normalizer(spatial_shapes, grad_offsets.dtype)
        grad_reference = grad_offsets.sum((2, 4)) * normalizer
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_reference,
        grad_offsets if needs[4] else None,
        grad_attn if needs[5] else None,
    )


_ms_deform_attn_offsets_op.register_autograd(_offsets_backward, setup_context=_setup_context)


# ---- second-order gradients ------------------------------------------------------------------------------------------
# Double backward (gradient penalties, Hessian-vector products) differentiates the reference's first-order gradients
# (grid_sample supports double backward; the kernels compute first-order gradients only): correct, and as slow as the
# reference. Like the first-order backward it is a custom op of its own, so that tracing (torch.compile) sees one
# opaque call; a third derivative is not supported.


def _double_backward_body(
    grad_grad_value, grad_grad_loc, grad_grad_attn, grad_output, value, spatial_shapes, level_start_index, points
):
    """Gradients of a backward op's inputs (grad_output, value, *points) given those of its outputs; `points` is
    (locations, weights) or (reference points, offsets, weights)."""
    with_reference_points = len(points) == 3
    shapes, _ = _levels(value, spatial_shapes, level_start_index)

    def core(value, *points):
        ref, loc, attn = points if with_reference_points else (None, *points)
        return _reference_core(value, shapes, spatial_shapes, loc, ref, attn)

    def first_order(grad_output, value, *points):
        grads = torch.func.vjp(core, value, *points)[1](grad_output)
        return grads[0], grads[-2], grads[-1]  # what the backward op returns: value, locations/offsets, weights

    # float16 and bfloat16 are computed in float32, as the kernels compute them
    ct = _compute_dtype(value.dtype)
    inputs = (grad_output, value, *points)
    _, vjp = torch.func.vjp(first_order, *(t.detach().to(ct) for t in inputs))
    grads = vjp(tuple(t.to(ct) for t in (grad_grad_value, grad_grad_loc, grad_grad_attn)))
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


@torch.library.custom_op("xmsda::ms_deform_attn_double_backward", mutates_args=())
def _ms_deform_attn_double_backward_op(
    grad_grad_value: torch.Tensor,
    grad_grad_locations: torch.Tensor,
    grad_grad_weights: torch.Tensor,
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grad_output, value, sampling_locations and attention_weights."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _double_backward_body(
        grad_grad_value,
        grad_grad_locations,
        grad_grad_weights,
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        (sampling_locations, attention_weights),
    )


@_ms_deform_attn_double_backward_op.register_fake
def _(grad_grad_value, grad_grad_loc, grad_grad_attn, grad_output, value, spatial_shapes, level_start_index, loc, attn):
    return tuple(torch.empty_like(t) for t in (grad_output, value, loc, attn))


@torch.library.custom_op("xmsda::ms_deform_attn_offsets_double_backward", mutates_args=())
def _ms_deform_attn_offsets_double_backward_op(
    grad_grad_value: torch.Tensor,
    grad_grad_offsets: torch.Tensor,
    grad_grad_weights: torch.Tensor,
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grad_output, value, reference_points, sampling_offsets and attention_weights."""
    check_offset_inputs(value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
    return _double_backward_body(
        grad_grad_value,
        grad_grad_offsets,
        grad_grad_weights,
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        (reference_points, sampling_offsets, attention_weights),
    )


@_ms_deform_attn_offsets_double_backward_op.register_fake
def _(grad_grad_value, grad_grad_off, grad_grad_attn, grad_output, value, shapes, starts, ref, off, attn):
    return tuple(torch.empty_like(t) for t in (grad_output, value, ref, off, attn))


def _second_order_backward(ctx, grad_grad_value, grad_grad_loc, grad_grad_attn):
    """Autograd formula of both backward ops: their double-backward op, on zeros for outputs without a gradient."""
    grad_output, value, spatial_shapes, level_start_index, *points = ctx.saved_tensors
    cotangents = [
        torch.zeros_like(t) if c is None else c
        for c, t in zip((grad_grad_value, grad_grad_loc, grad_grad_attn), (value, points[-2], points[-1]), strict=True)
    ]
    op = (
        torch.ops.xmsda.ms_deform_attn_offsets_double_backward
        if len(points) == 3
        else torch.ops.xmsda.ms_deform_attn_double_backward
    )
    grad_grad_output, grad_value, *grad_points = op(
        *cotangents, grad_output, value, spatial_shapes, level_start_index, *points
    )
    return grad_grad_output, grad_value, None, None, *grad_points


for _backward_op in (_ms_deform_attn_backward_op, _ms_deform_attn_offsets_backward_op):
    _backward_op.register_autograd(_second_order_backward, setup_context=_setup_context)

for _op in (_ms_deform_attn_op, _ms_deform_attn_offsets_op):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device_type, torch.float32)
