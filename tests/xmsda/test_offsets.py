"""`ms_deform_attn_offsets`: the op with the sampling locations made inside the kernels from reference points and
pixel offsets, as Deformable DETR's module makes them."""

from __future__ import annotations

import pytest
import torch

import xmsda
from xmsda.ops import locations_from_offsets, ms_deform_attn_offsets, offset_normalizer

from .conftest import assert_same_across_thread_counts, make_inputs


def make_offset_inputs(dtype=torch.float64, **kw):
    """Inputs whose locations (reference + offset / (W, H)) spread over [-0.2, 1.2]: inside, on and past the border."""
    value, ss, lsi, loc, attn = make_inputs(dtype=dtype, **kw)
    g = torch.Generator().manual_seed(7)
    N, Q, _, L, _, _ = loc.shape
    ref = torch.rand(N, Q, L, 2, generator=g, dtype=torch.float64).to(dtype)
    norm = offset_normalizer(ss, torch.float64)
    offsets = ((loc.double() - ref.double()[:, :, None, :, None, :]) * norm[:, None, :]).to(dtype)
    return value, ss, lsi, ref, offsets, attn


def grads(fn, value, ss, lsi, ref, offsets, attn):
    inputs = [t.detach().clone().requires_grad_() for t in (value, ref, offsets, attn)]
    out = fn(inputs[0], ss, lsi, inputs[1], inputs[2], inputs[3])
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), *(t.grad for t in inputs)


def via_locations(value, ss, lsi, ref, offsets, attn):
    return xmsda.ms_deform_attn(value, ss, lsi, locations_from_offsets(ref, offsets, ss), attn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_values_as_locations_computed_in_torch(dtype):
    inputs = make_offset_inputs(dtype, N=2, shapes=((9, 11), (5, 6), (3, 3)), Q=40, M=3, D=8, P=4)
    out, g_value, g_ref, g_off, g_attn = grads(ms_deform_attn_offsets, *inputs)
    out_t, g_value_t, g_ref_t, g_off_t, g_attn_t = grads(via_locations, *inputs)
    # The kernel computes each location with the module's own arithmetic: the same sampling points, bit for bit.
    assert torch.equal(out, out_t)
    assert torch.equal(g_value, g_value_t) and torch.equal(g_attn, g_attn_t)
    # The offsets' gradient is the pixel-space gradient itself (torch divides the location gradient by (W, H)).
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(g_off, g_off_t, **tol)
    torch.testing.assert_close(g_ref, g_ref_t, **tol)


def test_gradcheck_inside_on_and_past_the_border():
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=2, shapes=((5, 6), (3, 4), (1, 1)), Q=4, M=2, D=3, P=3)

    def f(v, r, o, a):
        return ms_deform_attn_offsets(v, ss, lsi, r, o, a)

    inputs = [t.detach().clone().requires_grad_() for t in (value, ref, offsets, attn)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_non_contiguous_inputs(dtype):
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=2, shapes=((6, 7), (3, 4)), Q=6, M=2, D=8, P=3)
    expected = ms_deform_attn_offsets(value, ss, lsi, ref, offsets, attn)
    # transposed copies of the batch axis: same values, non-contiguous strides
    half = [t.to(dtype).transpose(0, 1).contiguous().transpose(0, 1) for t in (value, ref, offsets, attn)]
    assert not any(t.is_contiguous() for t in half)
    out = ms_deform_attn_offsets(half[0], ss, lsi, half[1], half[2], half[3])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


def test_gradients_only_where_asked():
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=1, shapes=((4, 4),), Q=3, M=2, D=4, P=2)
    offsets.requires_grad_()
    ms_deform_attn_offsets(value, ss, lsi, ref, offsets, attn).sum().backward()
    assert offsets.grad is not None and value.grad is None and ref.grad is None and attn.grad is None


def _grad_output(v, off):
    return torch.randn(v.shape[0], off.shape[1], v.shape[2] * v.shape[3], generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    ("op", "make_args"),
    [
        (torch.ops.xmsda.ms_deform_attn.default, lambda v, ss, lsi, ref, off, a: (v, ss, lsi, off.abs() / 8, a)),
        (torch.ops.xmsda.ms_deform_attn_offsets.default, lambda v, ss, lsi, ref, off, a: (v, ss, lsi, ref, off, a)),
        (
            torch.ops.xmsda.ms_deform_attn_backward.default,
            lambda v, ss, lsi, ref, off, a: (_grad_output(v, off), v, ss, lsi, off.abs() / 8, a),
        ),
        (
            torch.ops.xmsda.ms_deform_attn_offsets_backward.default,
            lambda v, ss, lsi, ref, off, a: (_grad_output(v, off), v, ss, lsi, ref, off, a),
        ),
    ],
)
def test_registrations_pass_torch_opcheck(op, make_args):
    # schema, fake (meta) implementation, autograd registration (the backward ops' is the second-order one) and
    # their agreement with the real kernels
    inputs = make_offset_inputs(torch.float32, N=1, shapes=((4, 5), (2, 3)), Q=3, M=2, D=4, P=2)
    args = [t.requires_grad_() if t.is_floating_point() else t for t in make_args(*inputs)]
    torch.library.opcheck(op, args)


@pytest.mark.slow  # gradgradcheck; test_op.py's runs in the quick tier
def test_second_order_gradients():
    # double backward in every input, reference points included (see test_op's test of the same name)
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=1, shapes=((4, 5), (2, 3)), Q=3, M=2, D=3, P=2)
    inputs = [t.requires_grad_() for t in (value, ref, offsets, attn)]

    def f(v, r, o, a):
        return ms_deform_attn_offsets(v, ss, lsi, r, o, a)

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        (
            {"reference_points": torch.rand(2, 5, 2, 3, dtype=torch.float64)},
            ValueError,
            r"reference_points .*\[2, 5, 2, 2\]",
        ),
        ({"reference_points": torch.rand(2, 5, 2, 2)}, TypeError, "reference_points must have the dtype of value"),
        ({"reference_points": [[0.5, 0.5]]}, TypeError, "reference_points must be a torch.Tensor"),
        (
            {"sampling_offsets": torch.rand(2, 5, 2, 2, 3, dtype=torch.float64)},
            ValueError,
            "sampling_offsets must have",
        ),
        (
            {"sampling_offsets": torch.rand(2, 5, 2, 2, 3, 2)},
            TypeError,
            "value, sampling_offsets and attention_weights",
        ),
    ],
)
def test_invalid_inputs_raise(override, error, match):
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=4, P=3)
    args = {
        "value": value,
        "spatial_shapes": ss,
        "level_start_index": lsi,
        "reference_points": ref,
        "sampling_offsets": offsets,
        "attention_weights": attn,
    }
    args.update(override)
    with pytest.raises(error, match=match):
        ms_deform_attn_offsets(**args)
    if isinstance(args["reference_points"], torch.Tensor):  # the registered op checks them too
        with pytest.raises(error, match=match):
            torch.ops.xmsda.ms_deform_attn_offsets(*args.values())


def test_backward_op_checks_the_output_gradient():
    value, ss, lsi, ref, offsets, attn = make_offset_inputs(N=1, shapes=((4, 4),), Q=3, M=2, D=4, P=2)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[N, Q, M\*D\] = \[1, 3, 8\]"):
        torch.ops.xmsda.ms_deform_attn_offsets_backward(
            torch.zeros(1, 3, 7, dtype=value.dtype), value, ss, lsi, ref, offsets, attn
        )


def test_backward_is_deterministic_across_thread_counts(torch_threads):
    inputs = make_offset_inputs(torch.float32, N=2, shapes=((20, 30), (10, 15)), Q=300, M=2, D=32, P=4)
    assert_same_across_thread_counts(torch_threads, lambda: grads(ms_deform_attn_offsets, *inputs))
