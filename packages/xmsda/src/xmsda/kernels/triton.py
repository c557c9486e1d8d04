"""Triton kernels for multi-scale deformable attention: forward, backward with atomics, and a deterministic
value gradient without them.

Programs: the forward and the point-side backward run one program per (block of queries, image and head), all D
channels of the head in one [BLOCK_Q, BLOCK_D] tile; each point's four corners are gathered as rows of D contiguous
channels in Deformable DETR's own `[N, S, M, D]` layout (no transposes). Inputs of any float dtype are widened to the
compute dtype (float32, or float64 for float64 inputs) as they are loaded; outputs and gradients are written in the
compute dtype and rounded to the input dtype by the caller.

Semantics are those of the CPU kernels (kernels/cpu.py): pixel coordinates with the CPU reference's rounding
(`_pixel`), a point is sampled when -1 <= pixel < size in both coordinates (a non-finite location never is), a corner
outside the map reads zero and receives no gradient. With reference points (`HAS_REF`), `loc` holds offsets in pixels
of each level and the location is `ref + offset / (W, H)`; the backward then writes the offsets' gradient.

Backward, two modes for the value gradient (the location and weight gradients are owned by one program per point and
reduced over the channels in a fixed order in both):
- fast (`ATOMIC`): each corner adds `weight * grad_out` to its value-gradient row with atomics; the order of the
  additions, and so the rounding, changes from run to run.
- deterministic: the point-side kernel writes each point's four corner weights and a bucket key (image, head and its
  top-left corner cell, in a grid one cell wider than the map on each side), the caller sorts the keys (a stable sort:
  the order is a function of the inputs), and `value_grad_kernel` computes each value-gradient row from the four
  buckets whose points have a corner on it, corner by corner and each bucket in the sorted order: no atomics, every
  row written once, bit-identical on every run. Sorting points rather than corners keeps the sort four times
  smaller. Why this design and what it costs: docs/xmsda/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _query_block(Q, M, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image n and head m (grid axis 1), its block of queries (grid axis 0) as n * Q + q with their
    mask, and the channels with theirs."""
    nm = tl.program_id(1).to(tl.int64)
    n = nm // M
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    return n, nm % M, n * Q + q, q < Q, d, d < D


@triton.jit
def _level(shapes_ptr, starts_ptr, lvl):
    """Level lvl's height, width and first row in S."""
    return tl.load(shapes_ptr + 2 * lvl), tl.load(shapes_ptr + 2 * lvl + 1), tl.load(starts_ptr + lvl)


@triton.jit
def _pixel(loc, size):
    """The pixel coordinate of a normalised location, rounded as the CPU reference (ATen's grid_sample) gets it: the
    grid 2*loc - 1, then fma(grid + 1, size / 2, -1/2). Points on pixel centres then land in the same cell."""
    grid = (loc + loc) - 1.0
    return tl.fma(grid + 1.0, size * 0.5, tl.full(loc.shape, -0.5, loc.dtype))


@triton.jit
def _point(loc_ptr, ref_ptr, attn_ptr, nq, q_mask, m, lvl, p, H, W, M, L, P, HAS_REF: tl.constexpr, CT: tl.constexpr):
    """Point p of level lvl of head m, for a block of queries (`nq` = n*Q + q): its flat index in `[N, Q, M, L, P]`,
    top-left corner cell (h0, w0), fractions (lh, lw), attention weight, whether it is sampled, and d pixel / d input
    for x and y (W and H for locations, 1 for offsets). Fractions and cells of points not sampled are zeroed, so no
    NaN reaches the arithmetic."""
    pidx = ((nq * M + m) * L + lvl) * P + p
    Hf = H.to(CT)
    Wf = W.to(CT)
    x = tl.load(loc_ptr + 2 * pidx, mask=q_mask, other=0.0).to(CT)
    y = tl.load(loc_ptr + 2 * pidx + 1, mask=q_mask, other=0.0).to(CT)
    if HAS_REF:
        x = tl.load(ref_ptr + 2 * (nq * L + lvl), mask=q_mask, other=0.0).to(CT) + x / Wf
        y = tl.load(ref_ptr + 2 * (nq * L + lvl) + 1, mask=q_mask, other=0.0).to(CT) + y / Hf
        scale_x = tl.full(x.shape, 1.0, CT)
        scale_y = tl.full(x.shape, 1.0, CT)
    else:
        scale_x = tl.full(x.shape, 1.0, CT) * Wf
        scale_y = tl.full(x.shape, 1.0, CT) * Hf
    px = _pixel(x, Wf)
    py = _pixel(y, Hf)
    valid = q_mask & (px >= -1.0) & (px < Wf) & (py >= -1.0) & (py < Hf)
    px = tl.where(valid, px, 0.0)
    py = tl.where(valid, py, 0.0)
    fx = tl.floor(px)
    fy = tl.floor(py)
    a = tl.load(attn_ptr + pidx, mask=q_mask, other=0.0).to(CT)
    return pidx, fy.to(tl.int64), fx.to(tl.int64), py - fy, px - fx, a, valid, scale_x, scale_y


@triton.jit
def _corner(h0, w0, lh, lw, a, valid, H, W, start, d, d_mask, MD, DY: tl.constexpr, DX: tl.constexpr):
    """Corner (h0 + DY, w0 + DX) of a block of points: its bilinear weight times the attention weight (zero where the
    corner is outside the map or the point not sampled), and the offsets and mask of its [BLOCK_Q, BLOCK_D] tile of
    value rows from the head's first element."""
    h = h0 + DY
    w = w0 + DX
    inside = valid & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    fy = lh if DY == 1 else 1.0 - lh
    fx = lw if DX == 1 else 1.0 - lw
    weight = tl.where(inside, a * fy * fx, 0.0)
    offsets = (start + h * W + w)[:, None] * MD + d[None, :]
    return weight, offsets, inside[:, None] & d_mask[None, :]


@triton.jit
def _corner_backward(
    value,
    grad_value,
    weights,
    g,
    d,
    d_mask,
    q_mask,
    MD,
    h0,
    w0,
    lh,
    lw,
    a,
    valid,
    H,
    W,
    start,
    DY: tl.constexpr,
    DX: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Corner (DY, DX) of a block of points in the backward: returns <grad_out, value row> per point (0 outside the
    map); adds weight * grad_out to the value gradient's row (`ATOMIC`) or stores the weight (`weights`: the points'
    first entries of [points, 4])."""
    weight, offsets, mask = _corner(h0, w0, lh, lw, a, valid, H, W, start, d, d_mask, MD, DY, DX)
    v = tl.load(value + offsets, mask=mask, other=0.0).to(g.dtype)
    if ATOMIC:
        tl.atomic_add(grad_value + offsets, weight[:, None] * g, mask=mask, sem="relaxed")
    else:
        tl.store(weights + 2 * DY + DX, weight, mask=q_mask)
    return tl.sum(g * v, 1)


@triton.jit
def forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    ref_ptr,
    attn_ptr,
    out_ptr,
    Q,
    S,
    M,
    D,
    L,
    P,
    HAS_REF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[n, q, m, :] = sum over (l, p) of the attention weight times the bilinear sample of value[n, :, m, :]."""
    CT = out_ptr.dtype.element_ty
    n, m, nq, q_mask, d, d_mask = _query_block(Q, M, D, BLOCK_Q, BLOCK_D)
    head = value_ptr + n * S * M * D + m * D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), CT)
    for lvl in range(L):
        H, W, start = _level(shapes_ptr, starts_ptr, lvl)
        for p in range(P):
            _, h0, w0, lh, lw, a, valid, _, _ = _point(
                loc_ptr, ref_ptr, attn_ptr, nq, q_mask, m, lvl, p, H, W, M, L, P, HAS_REF, CT
            )
            for k in tl.static_range(4):
                weight, offsets, mask = _corner(h0, w0, lh, lw, a, valid, H, W, start, d, d_mask, M * D, k // 2, k % 2)
                acc += weight[:, None] * tl.load(head + offsets, mask=mask, other=0.0).to(CT)
    tl.store(out_ptr + (nq * M + m)[:, None] * D + d[None, :], acc, mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def backward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    cell_starts_ptr,
    loc_ptr,
    ref_ptr,
    attn_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    weights_ptr,
    keys_ptr,
    Q,
    S,
    CELLS,
    NOT_SAMPLED,
    M,
    D,
    L,
    P,
    HAS_REF: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of the locations (or offsets) and attention weights of a block of queries of one head; with
    `ATOMIC` the value gradient too (atomics into a zeroed buffer), else each point's four corner weights (`weights`,
    [points, 4]) and bucket key (`keys`: (n * CELLS + cell) * M + m, with `cell` its top-left corner in the level's
    grid of (H + 1) x (W + 1) cells that starts at cell_starts[l]; NOT_SAMPLED = N * CELLS * M, after every bucket,
    for a point not sampled), from which `value_grad_kernel` makes the value gradient."""
    CT = grad_loc_ptr.dtype.element_ty
    n, m, nq, q_mask, d, d_mask = _query_block(Q, M, D, BLOCK_Q, BLOCK_D)
    value = value_ptr + n * S * M * D + m * D
    grad_value = grad_value_ptr + n * S * M * D + m * D
    tile = (nq * M + m)[:, None] * D + d[None, :]
    g = tl.load(grad_out_ptr + tile, mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(CT)
    for lvl in range(L):
        H, W, start = _level(shapes_ptr, starts_ptr, lvl)
        for p in range(P):
            pidx, h0, w0, lh, lw, a, valid, scale_x, scale_y = _point(
                loc_ptr, ref_ptr, attn_ptr, nq, q_mask, m, lvl, p, H, W, M, L, P, HAS_REF, CT
            )
            weights = weights_ptr + 4 * pidx
            # from s_k = <grad_out, value at corner k> (0 outside): the weight's gradient sums the bilinear weights
            # times s_k, the pixel coordinates' their derivatives (-/+ the other fraction) times s_k
            grad_attn = tl.zeros((BLOCK_Q,), CT)
            grad_x = tl.zeros((BLOCK_Q,), CT)
            grad_y = tl.zeros((BLOCK_Q,), CT)
            for k in tl.static_range(4):
                s = _corner_backward(
                    value, grad_value, weights, g, d, d_mask, q_mask, M * D, h0, w0, lh, lw, a, valid, H, W, start,
                    k // 2, k % 2, ATOMIC,
                )  # fmt: skip
                fy = lh if k // 2 == 1 else 1.0 - lh
                fx = lw if k % 2 == 1 else 1.0 - lw
                grad_attn += fy * fx * s
                grad_x += (fy if k % 2 == 1 else -fy) * s
                grad_y += (fx if k // 2 == 1 else -fx) * s
            grad_x = a * scale_x * grad_x
            grad_y = a * scale_y * grad_y
            tl.store(grad_attn_ptr + pidx, tl.where(valid, grad_attn, 0.0), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * pidx, tl.where(valid, grad_x, 0.0), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * pidx + 1, tl.where(valid, grad_y, 0.0), mask=q_mask)
            if not ATOMIC:
                cell = tl.load(cell_starts_ptr + lvl) + (h0 + 1) * (W + 1) + (w0 + 1)
                key = tl.where(valid, (n * CELLS + cell) * M + m, NOT_SAMPLED)
                tl.store(keys_ptr + pidx, key.to(keys_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def value_grad_kernel(
    shapes_ptr,
    starts_ptr,
    cell_starts_ptr,
    bounds_ptr,
    order_ptr,
    weights_ptr,
    grad_out_ptr,
    grad_value_ptr,
    S,
    CELLS,
    M,
    D,
    L,
    LP,
    ROWS,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The deterministic value gradient: rows r = (n * S + s) * M + m of `[N, S, M, D]`, each the sum of weight *
    grad_out over the points with a corner on it, taken from the buckets (bounds[key], bounds[key + 1]) of the points
    sorted by key (`order`), corner by corner, in the sorted order."""
    CT = grad_value_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < ROWS
    m = r % M
    s = (r // M) % S
    n = r // (M * S)
    level = tl.zeros((BLOCK_R,), tl.int32)
    for lvl in range(1, L):
        level += (s >= tl.load(starts_ptr + lvl)).to(tl.int32)
    W = tl.load(shapes_ptr + 2 * level + 1, mask=r_mask, other=1)
    local = s - tl.load(starts_ptr + level, mask=r_mask, other=0)
    h = local // W
    w = local % W
    first_cell = tl.load(cell_starts_ptr + level, mask=r_mask, other=0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), CT)
    for k in tl.static_range(4):
        # the points whose corner k is this row's pixel have their top-left corner k // 2 rows up, k % 2 columns left
        cell = first_cell + (h + 1 - k // 2) * (W + 1) + (w + 1 - k % 2)
        key = (n * CELLS + cell) * M + m
        begin = tl.load(bounds_ptr + key, mask=r_mask, other=0)
        count = tl.load(bounds_ptr + key + 1, mask=r_mask, other=0) - begin
        for j in range(0, tl.max(count, 0)):
            active = j < count
            point = tl.load(order_ptr + begin + j, mask=active, other=0)
            weight = tl.load(weights_ptr + 4 * point + k, mask=active, other=0.0)
            rows = (point // LP)[:, None] * D + d[None, :]  # the point's (n, q, m) row of grad_out
            g = tl.load(grad_out_ptr + rows, mask=active[:, None] & d_mask[None, :], other=0.0)
            acc += weight[:, None] * g.to(CT)
    tl.store(grad_value_ptr + r[:, None] * D + d[None, :], acc, mask=r_mask[:, None] & d_mask[None, :])
