"""The op against the grid_sample reference: values, gradients, dtypes, layouts, determinism, compile."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import xmsda
from xmsda.kernels import cpu as cpu_kernels
from xmsda.kernels import simd
from xmsda.reference import ms_deform_attn_core_pytorch, ms_deform_attn_gather

from .conftest import assert_same_across_thread_counts, level_tensors, make_inputs, pixel_centre_locations


def op(value, spatial_shapes, level_start_index, loc, attn):
    return xmsda.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)


def gradcheck(value, spatial_shapes, level_start_index, loc, attn, wrt=(True, True, True), fast_mode=False):
    def f(v, lo, a):
        return op(v, spatial_shapes, level_start_index, lo, a)

    inputs = [t.detach().clone().requires_grad_(w) for t, w in zip((value, loc, attn), wrt, strict=True)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def grads(fn, value, spatial_shapes, level_start_index, loc, attn, grad_out=None):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    if fn is ms_deform_attn_core_pytorch:
        out = fn(inputs[0], spatial_shapes, inputs[1], inputs[2])
    else:
        out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), *(t.grad for t in inputs)


@pytest.mark.parametrize(
    ("shapes", "D", "P"),
    [
        (((5, 6),), 3, 1),  # one level, one point
        (((6, 7), (3, 4), (1, 1)), 4, 3),  # several levels (one of them a single pixel) and points
        (((4, 3), (2, 2)), 30, 2),  # odd channel counts: vector body plus remainder
        (((3, 4),), 71, 2),
    ],
)
def test_gradcheck_random_points(shapes, D, P):
    # Locations in [-0.2, 1.2]: inside, straddling the border and fully outside the maps.
    # Wide heads use gradcheck's fast mode (random projections of the Jacobian) to keep the suite quick.
    gradcheck(*make_inputs(N=2 if D < 30 else 1, shapes=shapes, Q=4, M=2, D=D, P=P), fast_mode=D >= 30)


def test_gradcheck_points_on_the_border_and_outside():
    value, ss, lsi, _, attn = make_inputs(N=1, shapes=((4, 5), (2, 3)), Q=4, M=2, D=3, P=4)
    # x and y from {0, 1} (the map's outer edge, half a pixel outside the border pixels), just inside, and
    # well outside (-0.5, 1.5: no corner inside).
    edge = torch.tensor(
        [[0.0, 0.33], [1.0, 0.61], [0.42, 0.0], [0.77, 1.0], [0.0, 1.0], [1.0, 0.0], [-0.5, 0.5], [0.5, 1.5]]
    )
    loc = edge[torch.arange(4 * 2 * 2 * 4) % len(edge)].view(1, 4, 2, 2, 4, 2).to(torch.float64)
    gradcheck(value, ss, lsi, loc, attn)
    out, *g = grads(op, value, ss, lsi, loc, attn)
    out_ref, *g_ref = grads(ms_deform_attn_core_pytorch, value, ss, lsi, loc, attn)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_non_finite_locations_sample_nothing_as_in_deformable_detrs_cuda_op(with_offsets):
    # Deformable DETR's CUDA op (and mmcv's) skips a point unless -1 < pixel < size, which no NaN or infinity passes:
    # the point adds nothing and gets zero gradients. The kernels do the same (the grid_sample reference returns NaN),
    # so offsets that overflow in half precision lose their points instead of poisoning the output.
    value, ss, lsi, loc, attn = make_inputs(N=1, shapes=((4, 5), (2, 3)), Q=4, M=2, D=5, P=3)
    inf, nan = float("inf"), float("nan")
    bad = torch.tensor([[nan, 0.5], [0.5, nan], [inf, 0.5], [-inf, 0.5], [0.5, inf], [0.5, -inf], [nan, nan]])
    spots = [(0, 0, 0, 0), (0, 1, 1, 2), (1, 0, 1, 1), (2, 1, 0, 0), (2, 1, 0, 1), (3, 0, 1, 2), (3, 1, 0, 2)]
    non_finite = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    outside = loc.clone()
    for (q, m, lvl, p), xy in zip(spots, bad, strict=True):
        loc[0, q, m, lvl, p] = xy.to(loc.dtype)
        outside[0, q, m, lvl, p] = 3.0  # no corner inside: what the point must amount to
        non_finite[0, q, m, lvl, p] = True
    if with_offsets:
        # the same locations as reference points plus pixel offsets (an infinite offset gives an infinite location)
        ref = torch.full((1, 4, 2, 2), 0.5, dtype=loc.dtype)
        size = ss.flip(-1).to(loc.dtype)[None, None, None, :, None, :]  # (W, H)
        offsets = (loc - ref[:, :, None, :, None, :]) * size
        inputs = [t.clone().requires_grad_() for t in (value, offsets, attn)]
        out = xmsda.ms_deform_attn_offsets(inputs[0], ss, lsi, ref, inputs[1], inputs[2])
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
        out, g = out.detach(), [t.grad for t in inputs]
        g[1] = g[1] * size  # offsets' gradient to locations' (d offset / d loc = size)
    else:
        out, *g = grads(op, value, ss, lsi, loc, attn)
    out_ref, *g_ref = grads(ms_deform_attn_core_pytorch, value, ss, lsi, outside, attn)
    assert ms_deform_attn_core_pytorch(value, ss, loc, attn).isnan().any()  # unlike the reference
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(g[0], g_ref[0])
    assert torch.equal(g[1][non_finite], torch.zeros_like(g[1][non_finite]))
    assert torch.equal(g[2][non_finite], torch.zeros_like(g[2][non_finite]))
    torch.testing.assert_close(g[1][~non_finite], g_ref[1][~non_finite])
    torch.testing.assert_close(g[2], g_ref[2])
    # the second order runs through the reference, which follows the kernels here too
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    first = torch.autograd.grad(op(inputs[0], ss, lsi, inputs[1], inputs[2]).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(t.square().sum() for t in first), inputs)
    assert all(t.isfinite().all() for t in second)


def test_second_order_gradients():
    # double backward (gradient penalties, Hessian-vector products) runs through the reference; gradgradcheck
    # compares it with finite differences of the kernels' first-order gradients, points inside and outside the maps
    value, ss, lsi, loc, attn = make_inputs(N=1, shapes=((4, 5), (2, 3)), Q=3, M=2, D=3, P=2)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradgradcheck(lambda v, lo, a: op(v, ss, lsi, lo, a), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_second_order_gradients_in_half_precision_compute_in_float32(dtype):
    value, ss, lsi, loc, attn = make_inputs(N=1, shapes=((4, 5), (2, 3)), Q=3, M=2, D=3, P=2)
    value, loc, attn = (t.to(dtype) for t in (value, loc, attn))

    def hessian_vector_products(compute_dtype):
        v, lo, a = (t.to(compute_dtype).requires_grad_() for t in (value, loc, attn))
        (grad_loc,) = torch.autograd.grad(op(v, ss, lsi, lo, a).sum(), lo, create_graph=True)
        # rounded to `dtype` in both runs, as the first-order op returns it for `dtype` inputs
        return torch.autograd.grad(grad_loc.to(dtype).float().square().sum(), (v, a))

    for low, high in zip(hessian_vector_products(dtype), hessian_vector_products(torch.float32), strict=True):
        assert low.dtype == dtype and torch.equal(low, high.to(dtype))


def test_points_exactly_on_pixel_centres():
    # Power-of-two maps make (i + 0.5) / W exact, so the pixel coordinate is exactly the integer i, where bilinear
    # interpolation has a kink: finite differences cannot check the location gradient there, so it is compared
    # with grid_sample's (which takes the upper-right cell, as the kernels do) and gradcheck covers the rest.
    shapes = ((4, 8), (2, 4))
    value, ss, lsi, _, attn = make_inputs(N=1, shapes=shapes, Q=6, M=2, D=5, P=2)
    loc = pixel_centre_locations(shapes, Q=6, M=2, P=2)
    gradcheck(value, ss, lsi, loc, attn, wrt=(True, False, True))
    out, *gr = grads(op, value, ss, lsi, loc, attn)
    out_ref, *gr_ref = grads(ms_deform_attn_core_pytorch, value, ss, lsi, loc, attn)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(gr, gr_ref, strict=True):
        torch.testing.assert_close(a, b)
    # At a pixel centre the sample is the pixel itself.
    v = value.view(1, -1, 2, 5)
    x, y = (loc[0, 0, 0, 0, 0] * torch.tensor([8, 4])).floor().long()
    single = torch.zeros_like(attn)
    single[0, 0, 0, 0, 0] = 1.0
    torch.testing.assert_close(op(value, ss, lsi, loc, single)[0, 0, :5], v[0, y * 8 + x, 0])


@pytest.mark.parametrize("D", cpu_kernels.SPECIALISED_CHANNELS)
def test_forward_kernels_compiled_for_a_head_size_match_the_generic_one(D):
    # Points inside, straddling the border and outside (the default spread), so both of the fast path and the
    # per-corner edge path run with the head size fixed at compile time.
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((7, 9), (4, 5)), Q=30, M=2, D=D, P=3, dtype=torch.float32)
    host = [t.numpy() for t in (value, ss, lsi, loc)]
    order = cpu_kernels.query_order(host[3], host[1], None)
    outputs = []
    for kernel in (cpu_kernels.FORWARD_KERNELS[D], cpu_kernels.FORWARD_KERNELS[None]):
        out = torch.empty(2, 30, 2, D)
        kernel(*host, None, attn.numpy(), order, out.numpy(), 8)
        outputs.append(out.view(2, 30, 2 * D))
    reference = ms_deform_attn_core_pytorch(value, ss, loc, attn)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[0], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(op(value, ss, lsi, loc, attn), outputs[0], atol=0, rtol=0)  # the op dispatches to it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_medium_shapes_match_reference(dtype):
    inputs = make_inputs(N=2, shapes=((24, 31), (12, 16), (6, 8), (3, 4)), Q=300, M=4, D=32, P=4, dtype=dtype)
    out, *g = grads(op, *inputs)
    out_ref, *g_ref = grads(ms_deform_attn_core_pytorch, *inputs)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, out_ref, **tol)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    # The gather formulation used as a benchmark baseline agrees too.
    out_gather, *g_gather = grads(lambda v, ss, lsi, lo, a: ms_deform_attn_gather(v, ss, lo, a), *inputs)
    torch.testing.assert_close(out_gather, out_ref, **tol)
    for a, b in zip(g_gather, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_backward_is_deterministic_across_runs_and_thread_counts(torch_threads):
    inputs = make_inputs(N=2, shapes=((20, 30), (10, 15), (5, 8)), Q=400, M=2, D=32, P=4, dtype=torch.float32)
    assert_same_across_thread_counts(torch_threads, lambda: grads(op, *inputs))


def test_backward_gives_the_same_gradients_however_its_tasks_are_cut(torch_threads):
    # One image and one level: the backward cuts its single task in two on 2 threads, not on 1.
    inputs = make_inputs(N=1, shapes=((20, 30),), Q=300, M=8, D=32, P=4, dtype=torch.float32)
    assert [cpu_kernels.backward_partition(1, 1, 8, t) for t in (1, 2)] == [(1, 1), (1, 2)]
    assert_same_across_thread_counts(torch_threads, lambda: grads(op, *inputs))
    # Every partition, on the kernel itself: tasks of one level or of all three, in 1-8 slices of heads (3 does not
    # divide the 8 heads); with locations, and with reference points and offsets.
    value, ss, lsi, loc, attn = (
        t.numpy()
        for t in make_inputs(N=2, shapes=((12, 17), (6, 9), (3, 5)), Q=300, M=8, D=32, P=4, dtype=torch.float32)
    )
    ref = torch.rand(2, 300, 3, 2, generator=torch.Generator().manual_seed(2)).numpy()
    grad_out = torch.randn(2, 300, 8, 32, generator=torch.Generator().manual_seed(1)).numpy()
    for points, reference in ((loc, None), (loc * 4, ref)):
        order = cpu_kernels.query_order(points, ss, reference)
        results = []
        for level_block in (1, 3):
            for slices in (1, 2, 3, 4, 8):
                gradients = (torch.zeros(value.shape), torch.empty(loc.shape), torch.empty(attn.shape))
                cpu_kernels.backward_kernel(
                    value,
                    ss,
                    lsi,
                    points,
                    reference,
                    attn,
                    order,
                    grad_out,
                    *(g.numpy() for g in gradients),
                    level_block,
                    slices,
                )
                results.append(gradients)
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                assert torch.equal(a, b)
    # a block of two of the three levels is refused (it would leave the third level without a task)
    order = cpu_kernels.query_order(loc, ss, None)
    gradients = (np.zeros(value.shape, np.float32), np.empty(loc.shape, np.float32), np.empty(attn.shape, np.float32))
    with pytest.raises(ValueError, match="level_block must divide"):
        cpu_kernels.backward_kernel(value, ss, lsi, loc, None, attn, order, grad_out, *gradients, 2, 1)


def test_backward_partition_cuts_tasks_only_where_threads_would_idle():
    partition = cpu_kernels.backward_partition
    # 2 threads: an even number of images take one task over all their levels each (three would leave a thread
    # idle for one); one image is cut into its levels, and a single level into two slices of heads
    assert partition(2, 4, 8, 2) == (4, 1) and partition(4, 3, 8, 2) == (3, 1) and partition(3, 4, 8, 2) == (1, 1)
    assert [partition(1, levels, 8, 2) for levels in (1, 2, 4)] == [(1, 2), (1, 1), (1, 1)]
    # one thread: whole images
    assert partition(1, 4, 8, 1) == (4, 1)
    # more threads than tasks: cut, so that the extra threads get work
    assert partition(2, 4, 8, 16) == (1, 2) and partition(1, 4, 8, 16) == (1, 4)
    # never more slices than heads
    assert partition(1, 1, 1, 16) == (1, 1) and partition(1, 1, 2, 16) == (1, 2)


def test_kernels_run_on_torchs_thread_count(torch_threads, monkeypatch):
    import numba

    from xmsda.kernels import cpu

    seen = []
    for name in ("forward", "backward_kernel"):
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, k=kernel, n=name: seen.append((n, numba.get_num_threads())) or k(*a))
    before = numba.get_num_threads()
    inputs = make_inputs(N=1, shapes=((6, 7),), Q=5, M=2, D=4, P=2)
    for threads in (1, 2):
        torch_threads(threads)
        grads(op, *inputs)
    expected = [(n, min(t, numba.config.NUMBA_NUM_THREADS)) for t in (1, 2) for n in ("forward", "backward_kernel")]
    assert seen == expected
    assert numba.get_num_threads() == before  # restored for the caller's own numba code


def test_query_order_is_a_locality_preserving_permutation():
    from xmsda.kernels import cpu

    _, ss, _, loc, _ = make_inputs(N=2, shapes=((32, 32), (16, 16)), Q=500, M=2, P=2, spread=(0.0, 1.0))
    loc[0, :7] = float("nan")  # non-finite locations still get a place
    order = torch.from_numpy(cpu.query_order(loc.numpy(), ss.numpy(), None))
    for n in range(2):
        assert torch.equal(order[n].sort().values, torch.arange(500))
    # Consecutive queries in the order sample close together: on a Z-order curve (of single pixels here) the mean
    # step between the mean locations of successive queries is far below that of the original (random) order.
    centre = loc[1, :, :, 0].mean((1, 2))  # [Q, 2]
    by_pixel = torch.from_numpy(cpu.query_order(loc.numpy(), ss.numpy(), None, tile_bits=0))
    step = (centre[by_pixel[1]].diff(dim=0)).norm(dim=1).mean()
    assert step < 0.3 * centre.diff(dim=0).norm(dim=1).mean()
    # By default the curve runs over tiles of 16x16 pixels of the finest level: each tile's queries come as one run,
    # in the order they came in (row-major in an encoder).
    assert cpu.QUERY_TILE_BITS == 4
    tile = (centre * 32).floor().clamp(0, 31).long() // 16  # [Q, 2]: the tile of each query's mean location
    tile_id = tile[:, 0] * 2 + tile[:, 1]
    runs = torch.unique_consecutive(tile_id[order[1]])
    assert len(runs) == len(tile_id.unique())  # every tile is one run (as on any Z-order curve of aligned squares)
    for t in runs:
        members = order[1][tile_id[order[1]] == t]
        assert torch.equal(members, members.sort().values)
    # ties keep the order the queries come in (the sort is stable)
    tied = torch.full_like(loc, 0.5)
    tied[:, 100:] = 0.25
    expected = torch.cat([torch.arange(100, 500), torch.arange(100)])  # (0.25, 0.25) comes first on the curve
    assert torch.equal(torch.from_numpy(cpu.query_order(tied.numpy(), ss.numpy(), None)), expected.expand(2, -1))
    # the keys hold a query's index in 32 bits: more queries are refused (a broadcast view: no memory behind it)
    too_many = np.broadcast_to(np.float32(0.5), (1, 2**32, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="at most 2\\*\\*32 - 1 queries"):
        cpu.query_order(too_many, ss.numpy(), None)


def test_results_do_not_depend_on_the_order_queries_come_in():
    # The kernels visit queries in their own (location-sorted) order; each query's output is computed alone, so
    # permuting the queries permutes the output bit for bit.
    inputs = make_inputs(N=1, shapes=((12, 16), (6, 8)), Q=200, M=2, D=8, P=3, dtype=torch.float32, spread=(0, 1))
    value, ss, lsi, loc, attn = inputs
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    out = op(value, ss, lsi, loc, attn)
    assert torch.equal(op(value, ss, lsi, loc[:, perm], attn[:, perm]), out[:, perm])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    inputs = make_inputs(N=2, shapes=((12, 16), (6, 8)), Q=50, M=2, D=16, P=4, dtype=torch.float32)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    out, *g = grads(op, *low)
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    # The reference on the same (rounded) inputs, in float32: the only error left is the final rounding.
    exact = [t.to(torch.float32) if t.is_floating_point() else t for t in low]
    out_ref, *g_ref = grads(ms_deform_attn_core_pytorch, *exact)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), out_ref, atol=4 * eps, rtol=2 * eps)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.float(), b, atol=8 * eps * b.abs().max().item(), rtol=2 * eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 32])  # the generic forward kernel, and one compiled for the head size
def test_half_precision_inputs_are_read_as_they_are(dtype, D):
    # the kernels widen half-precision elements to float32 as they read them: outputs and gradients are, bit for bit,
    # those of the inputs converted to float32 first, rounded to `dtype`, special values included
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=9, M=2, D=D, P=3, dtype=dtype)
    value[:, :, 1, 0] = float("nan")  # every pixel of a channel, so that the outputs see them
    value[:, :, 0, 1] = float("inf")
    ref = loc[:, :, 0, :, 0, :].contiguous()
    offsets = (loc - ref[:, :, None, :, None, :]) * 4
    grad_out = torch.randn(2, 9, 2 * D, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run(convert):
        # (the reference points' gradient is torch's sum of the offsets', in the input dtype: not compared)
        v, o, lo, a = (convert(t).requires_grad_() for t in (value, offsets, loc, attn))
        results = []
        for out in (op(v, ss, lsi, lo, a), xmsda.ms_deform_attn_offsets(v, ss, lsi, convert(ref), o, a)):
            out.backward(convert(grad_out))
            results += [out.detach(), *(t.grad for t in (v, o, lo, a) if t.grad is not None)]
            for t in (v, o, lo, a):
                t.grad = None
        return [t.to(dtype) for t in results]

    low, upcast = run(lambda t: t.detach().clone()), run(lambda t: t.detach().float())
    assert low[0].isnan().any() and low[0].isinf().any()
    for a, b in zip(low, upcast, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_kernel_cache_follows_simd_py():
    # numba's on-disk cache of the kernels is keyed on cpu.py's contents only: without this digest there, an edit of
    # the vector code in simd.py would leave every cached kernel compiled from the old code
    source = Path(simd.__file__).read_bytes()
    assert hashlib.sha256(source).hexdigest() == cpu_kernels.SIMD_SOURCE_SHA256, (
        "kernels/simd.py changed: set SIMD_SOURCE_SHA256 in kernels/cpu.py to its new SHA-256"
    )


def test_non_contiguous_inputs():
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=3, D=4, P=2)
    # Same values, other strides: value stored [N, M, S, D]; locations stored (y, x)-major; weights transposed.
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_nc = loc.movedim(-1, 0).contiguous().movedim(0, -1)
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    ss_nc = torch.stack([ss[:, 0], ss[:, 1]], 1).t().contiguous().t()
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, ss_nc))
    out, *g = grads(op, value_nc, ss_nc, lsi, loc_nc, attn_nc)
    out_ref, *g_ref = grads(op, value, ss, lsi, loc, attn)
    assert torch.equal(out, out_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)
    # the kernels ran on the arrays' C-ordered copies: strides alone compile nothing new
    kernels = (cpu_kernels.FORWARD_KERNELS[None], cpu_kernels.backward_kernel, cpu_kernels._query_keys)
    layouts = {arg.layout for kernel in kernels for sig in kernel.signatures for arg in sig if hasattr(arg, "layout")}
    assert layouts == {"C"}


def test_int32_index_tensors_are_accepted():
    value, ss, lsi, loc, attn = make_inputs()
    torch.testing.assert_close(op(value, ss.int(), lsi.int(), loc, attn), op(value, ss, lsi, loc, attn))


def test_torch_compile_and_export_see_through_the_op():
    from xmsda.nn import MSDeformAttn

    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    ss, lsi = level_tensors(((6, 5), (3, 3)))
    query = torch.randn(2, 7, 16)
    ref_points = torch.rand(2, 7, 2, 2)
    flat = torch.randn(2, 39, 16)
    eager = module(query, ref_points, flat, ss, lsi)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(query, ref_points, flat, ss, lsi)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    grads_compiled = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    eager.sum().backward()
    for a, p in zip(grads_compiled, module.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    exported = torch.export.export(module, (query, ref_points, flat, ss, lsi))
    assert "xmsda.ms_deform_attn" in str(exported.graph)
    torch.testing.assert_close(exported.module()(query, ref_points, flat, ss, lsi), eager)


def test_under_autocast_the_ops_run_on_float32_inputs():
    # autocast hands the op bfloat16 projections next to float32 locations; it computes in float32, exactly as on
    # the upcast inputs, through the wrappers and through torch.ops alike
    from xmsda.ops import ms_deform_attn_offsets

    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=8, P=3, dtype=torch.float32)
    ref = loc[:, :, 0, :, 0, :].contiguous()
    offsets = (loc - ref[:, :, None, :, None, :]) * 5.0
    low = [t.bfloat16() for t in (value, attn, offsets)]
    up = [t.float() for t in low]
    expected = xmsda.ms_deform_attn(up[0], ss, lsi, loc, up[1])
    expected_offsets = ms_deform_attn_offsets(up[0], ss, lsi, ref, up[2], up[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for out in (
            xmsda.ms_deform_attn(low[0], ss, lsi, loc, low[1]),
            torch.ops.xmsda.ms_deform_attn(low[0], ss, lsi, loc, low[1]),
        ):
            assert out.dtype == torch.float32 and torch.equal(out, expected)
        for out in (
            ms_deform_attn_offsets(low[0], ss, lsi, ref, low[2], low[1]),
            torch.ops.xmsda.ms_deform_attn_offsets(low[0], ss, lsi, ref, low[2], low[1]),
        ):
            assert out.dtype == torch.float32 and torch.equal(out, expected_offsets)
