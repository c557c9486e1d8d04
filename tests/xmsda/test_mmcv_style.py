"""The drop-ins for mmcv-style callers: the grid_sample function's and the CUDA Function's signatures on the op.

(transformers' Mask2Former and OneFormer call the function form for real: test_transformers.py.)"""

from __future__ import annotations

import pytest
import torch

from xmsda.integrations.mmcv_style import MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch
from xmsda.reference import ms_deform_attn_core_pytorch

from .conftest import make_inputs

SHAPES = ((6, 7), (3, 4), (2, 2))


def outputs_and_grads(fn, value, loc, attn, grad_out=None):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(grad_out)
    return [out.detach(), *(t.grad for t in inputs)]


@pytest.mark.parametrize("shapes_as", ["tensor", "list"])
def test_function_form_computes_the_grid_sample_function(shapes_as):
    # mmcv and detrex pass the shapes as a tensor, ultralytics and transformers as a list of (H, W)
    value, ss, _, loc, attn = make_inputs(N=2, shapes=SHAPES, Q=6, M=2, D=5, P=3)
    shapes = ss if shapes_as == "tensor" else [tuple(hw) for hw in ss.tolist()]
    got = outputs_and_grads(lambda v, lo, a: multi_scale_deformable_attn_pytorch(v, shapes, lo, a), value, loc, attn)
    expected = outputs_and_grads(lambda v, lo, a: ms_deform_attn_core_pytorch(v, ss, lo, a), value, loc, attn)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_function_form_takes_levels_and_points_folded_into_one_axis():
    # ultralytics' RT-DETR passes locations [N, Q, M, L*P, 2] and weights [N, Q, M, L*P], level-major (P != L here,
    # so that reading the axis point-major would fail)
    value, ss, _, loc, attn = make_inputs(N=1, shapes=SHAPES, Q=4, M=2, D=4, P=2)
    N, Q, M, L, P, _ = loc.shape
    unfolded = outputs_and_grads(lambda v, lo, a: multi_scale_deformable_attn_pytorch(v, ss, lo, a), value, loc, attn)
    folded = outputs_and_grads(
        lambda v, lo, a: multi_scale_deformable_attn_pytorch(v, ss, lo, a),
        value,
        loc.reshape(N, Q, M, L * P, 2),
        attn.reshape(N, Q, M, L * P),
    )
    assert torch.equal(folded[0], unfolded[0]) and torch.equal(folded[1], unfolded[1])
    assert torch.equal(folded[2], unfolded[2].reshape(N, Q, M, L * P, 2))
    assert torch.equal(folded[3], unfolded[3].reshape(N, Q, M, L * P))
    # a folded tensor that is not contiguous (here: a transposed copy) unfolds as well
    strided = torch.empty(N, Q, M, 2, L * P, dtype=loc.dtype).transpose(-1, -2).copy_(loc.reshape(N, Q, M, L * P, 2))
    assert not strided.is_contiguous()
    assert torch.equal(multi_scale_deformable_attn_pytorch(value, ss, strided, attn.reshape(N, Q, M, L * P)), folded[0])


def test_function_form_names_what_is_wrong_with_folded_points():
    value, ss, _, loc, attn = make_inputs(N=1, shapes=SHAPES, Q=4, M=2, D=4, P=3)
    folded_loc, folded_attn = loc.reshape(1, 4, 2, 9, 2), attn.reshape(1, 4, 2, 9)
    with pytest.raises(ValueError, match=r"sampling_locations: expected \[N, Q, M, L\*P, 2\].*L=2 levels"):
        multi_scale_deformable_attn_pytorch(value[:, : 6 * 7 + 3 * 4], ss[:2], folded_loc, folded_attn)
    with pytest.raises(ValueError, match=r"sampling_locations: expected \[N, Q, M, L\*P, 2\].*got \[1, 4, 2, 9, 1\]"):
        multi_scale_deformable_attn_pytorch(value, ss, folded_loc[..., :1], folded_attn)
    with pytest.raises(ValueError, match=r"attention_weights: expected \[N, Q, M, L\*P\] = \[1, 4, 2, 9\]"):
        multi_scale_deformable_attn_pytorch(value, ss, folded_loc, folded_attn[..., :8])


def test_autograd_function_form_is_the_op_and_ignores_im2col_step():
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=SHAPES, Q=5, M=2, D=4, P=2)
    results = [
        outputs_and_grads(
            lambda v, lo, a, step=step: MultiScaleDeformableAttnFunction.apply(v, ss, lsi, lo, a, step),
            value,
            loc,
            attn,
        )
        for step in (64, 1)
    ]
    expected = outputs_and_grads(lambda v, lo, a: ms_deform_attn_core_pytorch(v, ss, lo, a), value, loc, attn)
    for got, again, e in zip(*results, expected, strict=True):
        assert torch.equal(got, again)
        torch.testing.assert_close(got, e, rtol=1e-10, atol=1e-12)


def test_mixed_dtypes_are_refused_not_cast():
    value, ss, lsi, loc, attn = make_inputs(N=1, shapes=SHAPES, Q=3, M=2, D=4, P=2, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        MultiScaleDeformableAttnFunction.apply(value.bfloat16(), ss, lsi, loc, attn, 64)
    with pytest.raises(TypeError, match="dtype"):
        multi_scale_deformable_attn_pytorch(value, ss, loc.double(), attn)
