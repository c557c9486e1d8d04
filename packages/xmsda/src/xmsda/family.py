"""One factory for the op family: each public op is three `torch.library` custom ops (forward, backward, double
backward) with fake implementations, autograd and autocast, made from its list of point tensors.

  ms_deform_attn          (sampling_locations, attention_weights)
  ms_deform_attn_offsets  (reference_points, sampling_offsets, attention_weights): locations made inside the kernels

The forward and backward ops take the keyword-only `backend` (None: by device, see `backends.select`) and
`deterministic` (None: `torch.are_deterministic_algorithms_enabled()` when the backward runs, as torch's own ops
follow it). The fake implementations let torch.compile and torch.export trace through every op.

Second-order gradients (gradient penalties, Hessian-vector products) differentiate the reference's first-order
gradients (grid_sample supports double backward; the kernels compute first-order gradients only): correct, and as
slow as the reference. Like the first-order backward it is an op of its own, so that tracing sees one opaque call; a
third derivative is not supported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import backends, validation
from .backends import reference as reference_backend
from .reference import offset_normalizer

__all__ = ["OpFamily", "define_family"]

_OPTIONS = "*, str? backend=None, bool? deterministic=None"
_LEVELS = ("value", "spatial_shapes", "level_start_index")


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """The registered ops of one member of the family (torch.ops.xmsda.<name>, <name>_backward,
    <name>_double_backward) and the names of its point tensors."""

    name: str
    points: tuple[str, ...]
    check: Callable
    forward: object
    backward: object
    double_backward: object

    def __call__(self, *tensors, backend=None, deterministic=None):
        """The forward op on `tensors` (value, spatial_shapes, level_start_index, *points), checked first, and on
        float32 inputs under autocast (`autocast_to_float32`)."""
        tensors = autocast_to_float32(*tensors)
        self.check(*tensors)
        return self.forward(*tensors, backend=backend, deterministic=deterministic)


def autocast_to_float32(*tensors):
    """Under autocast (torch.autocast on the tensors' device) the op runs on float32 inputs, as the registered ops do
    for callers of torch.ops (`torch.library.register_autocast` below): autocast hands it bfloat16/float16
    projections next to float32 reference points and locations, and locations need float32 anyway (in bfloat16 a
    location on a 167-pixel-wide map is off by up to a third of a pixel). The output is float32; the next autocast
    op casts it."""
    device_type = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if not (device_type and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _split(points):
    """(loc, ref, attn) from a member's point tensors: `ref` None for locations, else reference points with `loc`
    holding the offsets."""
    return (points[0], None, points[1]) if len(points) == 2 else (points[1], points[0], points[2])


def _levels(value, spatial_shapes, level_start_index):
    shapes, starts = validation.levels(value, spatial_shapes, level_start_index)
    return backends.Levels(shapes, starts, spatial_shapes, level_start_index)


def define_family(name: str, points: tuple[str, ...], check: Callable) -> OpFamily:
    """Register xmsda::<name> and its backward and double-backward ops for the point tensors `points` (two: locations
    and weights; three: reference points, offsets and weights), checked by `check(value, spatial_shapes,
    level_start_index, *points)`."""
    tensors = (*_LEVELS, *points)
    args = ", ".join(f"Tensor {t}" for t in tensors)
    loc_name = points[-2]

    def prepare(value, spatial_shapes, level_start_index, *point_tensors):
        # Checked here too: callers of torch.ops.xmsda.* skip the Python wrappers, and the kernels trust these bounds.
        check(value, spatial_shapes, level_start_index, *point_tensors)
        return _levels(value, spatial_shapes, level_start_index), _split(point_tensors)

    def forward_impl(value, spatial_shapes, level_start_index, *point_tensors, backend=None, deterministic=None):
        levels, points = prepare(value, spatial_shapes, level_start_index, *point_tensors)
        return backends.select(backend, value.device).forward(value, levels, *points)

    def backward_impl(grad_output, *inputs, backend=None, deterministic=None):
        levels, (loc, ref, attn) = prepare(*inputs)
        value = inputs[0]
        validation.check_grad_output(grad_output, value, loc)
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        chosen = backends.select(backend, value.device)
        return chosen.backward(grad_output, value, levels, loc, ref, attn, deterministic)

    def double_backward_impl(grad_grad_value, grad_grad_loc, grad_grad_attn, grad_output, *inputs):
        levels, _ = prepare(*inputs)
        value, _, _, *point_tensors = inputs
        cotangents = (grad_grad_value, grad_grad_loc, grad_grad_attn)
        return _double_backward(cotangents, grad_output, value, levels, point_tensors)

    forward = torch.library.custom_op(
        f"xmsda::{name}", forward_impl, mutates_args=(), schema=f"({args}, {_OPTIONS}) -> Tensor"
    )
    backward = torch.library.custom_op(
        f"xmsda::{name}_backward",
        backward_impl,
        mutates_args=(),
        schema=f"(Tensor grad_output, {args}, {_OPTIONS}) -> (Tensor, Tensor, Tensor)",
    )
    outputs = ", ".join(["Tensor"] * (2 + len(points)))
    double_backward = torch.library.custom_op(
        f"xmsda::{name}_double_backward",
        double_backward_impl,
        mutates_args=(),
        schema=f"(Tensor grad_grad_value, Tensor grad_grad_{loc_name}, Tensor grad_grad_weights, "
        f"Tensor grad_output, {args}) -> ({outputs})",
    )

    @forward.register_fake
    def _(value, spatial_shapes, level_start_index, *point_tensors, backend=None, deterministic=None):
        N, _, M, D = value.shape
        return value.new_empty(N, point_tensors[-1].shape[1], M * D)

    @backward.register_fake
    def _(grad_output, value, spatial_shapes, level_start_index, *point_tensors, backend=None, deterministic=None):
        return tuple(torch.empty_like(t) for t in (value, point_tensors[-2], point_tensors[-1]))

    @double_backward.register_fake
    def _(grad_grad_value, grad_grad_loc, grad_grad_attn, grad_output, value, *levels_and_points):
        return tuple(torch.empty_like(t) for t in (grad_output, value, *levels_and_points[2:]))

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.options = keyword_only_inputs

    def first_order(ctx, grad_output):
        value, spatial_shapes, level_start_index, *point_tensors = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = backward(
            grad_output, value, spatial_shapes, level_start_index, *point_tensors, **ctx.options
        )
        needs = ctx.needs_input_grad
        grads = [grad_value if needs[0] else None, None, None]
        if len(point_tensors) == 3:
            # location = reference + offset / (W, H): d/d(reference) is (W, H) times d/d(offset), summed over heads
            # and points
            grad_reference = None
            if needs[3]:
                grad_reference = grad_loc.sum((2, 4)) * offset_normalizer(spatial_shapes, grad_loc.dtype)
            grads.append(grad_reference)
        grads += [grad_loc if needs[-2] else None, grad_attn if needs[-1] else None]
        return tuple(grads)

    def backward_setup_context(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)

    def second_order(ctx, grad_grad_value, grad_grad_loc, grad_grad_attn):
        """Autograd formula of the backward op: its double-backward op, on zeros for outputs without a gradient."""
        grad_output, value, spatial_shapes, level_start_index, *point_tensors = ctx.saved_tensors
        cotangents = [
            torch.zeros_like(t) if c is None else c
            for c, t in zip((grad_grad_value, grad_grad_loc, grad_grad_attn), (value, *point_tensors[-2:]), strict=True)
        ]
        grad_grad_output, grad_value, *grad_points = double_backward(
            *cotangents, grad_output, value, spatial_shapes, level_start_index, *point_tensors
        )
        return grad_grad_output, grad_value, None, None, *grad_points

    forward.register_autograd(first_order, setup_context=setup_context)
    backward.register_autograd(second_order, setup_context=backward_setup_context)
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(forward, device_type, torch.float32)
    return OpFamily(name, points, check, forward, backward, double_backward)


def _double_backward(cotangents, grad_output, value, levels, point_tensors):
    """Gradients of a backward op's inputs (grad_output, value, *points) given those of its outputs, through the
    reference's first-order gradients."""

    def core(value, *points):
        return reference_backend.core(value, levels, *_split(points))

    def first_order(grad_output, value, *points):
        grads = torch.func.vjp(core, value, *points)[1](grad_output)
        return grads[0], grads[-2], grads[-1]  # what the backward op returns: value, locations/offsets, weights

    # float16 and bfloat16 are computed in float32, as the kernels compute them
    ct = torch.float64 if value.dtype == torch.float64 else torch.float32
    inputs = (grad_output, value, *point_tensors)
    _, vjp = torch.func.vjp(first_order, *(t.detach().to(ct) for t in inputs))
    grads = vjp(tuple(t.to(ct) for t in cotangents))
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))
