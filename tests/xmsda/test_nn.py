"""MSDeformAttn: Deformable DETR's module on the op."""

from __future__ import annotations

import math

import pytest
import torch

from xmsda import ops
from xmsda.nn import MSDeformAttn
from xmsda.ops import locations_from_offsets
from xmsda.reference import ms_deform_attn_core_pytorch

from .conftest import level_tensors


def test_parameters_and_initialisation_follow_deformable_detr():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {
        "sampling_offsets.weight": (4 * 3 * 2 * 2, 32),
        "sampling_offsets.bias": (4 * 3 * 2 * 2,),
        "attention_weights.weight": (4 * 3 * 2, 32),
        "attention_weights.bias": (4 * 3 * 2,),
        "value_proj.weight": (32, 32),
        "value_proj.bias": (32,),
        "output_proj.weight": (32, 32),
        "output_proj.bias": (32,),
    }
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()
    bias = m.sampling_offsets.bias.view(4, 3, 2, 2)
    # head h points along angle 2*pi*h/4, scaled so the larger coordinate is +-1, times (point index + 1)
    for h in range(4):
        theta = 2 * math.pi * h / 4
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()
        for p in range(2):
            torch.testing.assert_close(bias[h, :, p], (direction * (p + 1)).expand(3, 2))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=4)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_grid_sample_formulation(monkeypatch, ref_dim):
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    ss, lsi = level_tensors(((7, 6), (4, 3)))
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref_points = torch.rand(2, 5, 2, ref_dim, dtype=torch.float64, requires_grad=True)  # e.g. a decoder's
    flat = torch.randn(2, 54, 16, dtype=torch.float64)
    mask = torch.zeros(2, 54, dtype=torch.bool)
    mask[1, -10:] = True

    def run():
        m.zero_grad()
        ref_points.grad = None
        out = m(query, ref_points, flat, ss, lsi, mask)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()] + [ref_points.grad.clone()]

    out, grads = run()
    use_grid_sample_core(monkeypatch)
    out_ref, grads_ref = run()
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    assert ops  # the op module is what the module calls by default


def use_grid_sample_core(monkeypatch):
    """Make MSDeformAttn Deformable DETR's own module: locations computed in torch, then the grid_sample core."""
    monkeypatch.setattr("xmsda.nn.ms_deform_attn", lambda v, s, i, lo, a: ms_deform_attn_core_pytorch(v, s, lo, a))
    monkeypatch.setattr(
        "xmsda.nn.ms_deform_attn_offsets",
        lambda v, s, i, r, o, a: ms_deform_attn_core_pytorch(v, s, locations_from_offsets(r, o, s), a),
    )


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_gradient_penalty_through_the_module(monkeypatch, ref_dim):
    # a second-order loss (the squared gradient of the output with respect to the encoder's input, as in gradient
    # penalties) trains the same parameters with the op as with Deformable DETR's module
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    ss, lsi = level_tensors(((5, 4), (2, 3)))
    flat = torch.randn(1, 26, 8, dtype=torch.float64, requires_grad=True)
    ref_points = torch.rand(1, 26, 2, ref_dim, dtype=torch.float64)

    def run():
        m.zero_grad()
        out = m(flat, ref_points, flat, ss, lsi)  # an encoder layer: the maps are the queries
        (grad_flat,) = torch.autograd.grad(out.sin().sum(), flat, create_graph=True)
        grad_flat.square().sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    grads = run()
    use_grid_sample_core(monkeypatch)
    for a, b in zip(grads, run(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_trains_under_cpu_autocast(ref_dim):
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    ss, lsi = level_tensors(((7, 6), (4, 3)))
    query, flat = torch.randn(2, 5, 32), torch.randn(2, 54, 32)
    ref_points = torch.rand(2, 5, 2, ref_dim)
    expected = m(query, ref_points, flat, ss, lsi)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(query, ref_points, flat, ss, lsi)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16  # from output_proj; the sampling core ran in float32
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
