"""Shared input builders for the xmsda tests."""

from __future__ import annotations

import pytest
import torch


def level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=4, P=2, dtype=torch.float64, spread=(-0.2, 1.2), seed=0):
    """Random inputs; locations uniform in `spread` so some points fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    L = spatial_shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    lo, hi = spread
    loc = (torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    attn = (attn / attn.sum((-1, -2), keepdim=True)).to(dtype)
    return value, spatial_shapes, level_start_index, loc, attn


def pixel_centre_locations(shapes, Q, M, P, seed=3):
    """Locations `[1, Q, M, L, P, 2]` on random pixel centres of power-of-two maps, where (i + 0.5) / W is exact: the
    pixel coordinate is then exactly the integer i, where bilinear interpolation has a kink."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.empty(1, Q, M, len(shapes), P, 2, dtype=torch.float64)
    for lvl, (H, W) in enumerate(shapes):
        loc[..., lvl, :, 0] = (torch.randint(0, W, (1, Q, M, P), generator=g) + 0.5) / W
        loc[..., lvl, :, 1] = (torch.randint(0, H, (1, Q, M, P), generator=g) + 0.5) / H
    return loc


def assert_ratios_point_the_right_way(entry, baseline, key):
    """In a bench report's phase `entry`, the ratio `key` of a variant is above 1 exactly where it ran faster than
    `baseline`, whose own ratio is 1."""
    base = entry[baseline]["median_s"]
    assert entry[baseline][key] == 1.0
    for e in entry.values():
        assert (e[key] > 1) == (e["median_s"] < base)


@pytest.fixture
def torch_threads():
    """Set torch's intra-op thread count (which the op's kernels follow) inside a test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def assert_same_across_thread_counts(set_threads, compute):
    """`compute()` (a tuple of tensors) gives bit-identical results on repeated runs with 1 and 2 threads."""
    results = []
    for threads in (1, 2, 2, 1):
        set_threads(threads)
        results.append(compute())
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
