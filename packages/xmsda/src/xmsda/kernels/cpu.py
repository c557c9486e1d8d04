"""Fused CPU kernels for multi-scale deformable attention, compiled with numba.

Layout: the kernels read `value` in Deformable DETR's own `[N, S, M, D]` layout and write the value gradient in it,
so no transposes surround them. With heads as the innermost task loop (see below) the M heads of a pixel are one
contiguous run, and the two horizontally adjacent corners of a tap are M*D elements apart (a head-major copy was
slower in the backward: docs/xmsda/kernels.md).

Channels: the backward's interior points (all four corners inside: nearly all of them) run explicit 64-byte vector
code (`simd.interior_corners_backward`; see there why). Every other channel
loop indexes the last axis of a C-contiguous array with the loop counter, so LLVM emits contiguous vector loads (a
flat index `base + d` of unknown sign would become a gather, because numba wraps negative indices). Per-query
accumulators live in stack buffers, which LLVM knows alias no array argument, so the loops need no runtime overlap
checks. The forward kernel is also compiled for common head sizes as constants (SPECIALISED_CHANNELS), where the
channel loops unroll and the accumulator stays in registers.

Two phases per query: first the pixel cells and fractions of all its coordinates in one branch-free loop that LLVM
vectorises (`_cells`), then per point the four-corner gather-FMA over the channels. Doing the coordinate arithmetic
point by point in scalar code cost more than the channel loops themselves.

Work partition (no atomics, deterministic): the forward splits over (batch, block of queries), each task owning its
output rows. The backward splits over (batch, block of levels, slice of heads), the block one level or all of them
(`backward_partition`): a level's value rows are disjoint from every other level's, so each task owns its rows of the
value gradient and accumulates into them in a fixed (query order, point) order; the gradients of locations and
weights are owned per level too. The result is bit-identical for any thread count and partition. Heads are the
innermost task loop in both, so the per-query tensors (locations, weights, output, output gradient, all
`[N, Q, M, ...]`) stream contiguously: with heads outermost, their 1 KiB stride made the backward's reads of grad_out
alone cost a third of its time.

Query order: both kernels visit the queries in the order `query_order` returns, along a Z-order (Morton) curve of
16x16-pixel tiles of where each query samples, each tile's queries in the order they come. Queries that sample near
each other then run one after another and find their value rows still in L1/L2; in Deformable DETR's encoder,
row-major order sweeps a band of the map several rows high that (at every level together) exceeds the L2. Within a
tile the encoder's queries keep their row-major order, so the per-query tensors are read in runs of consecutive
queries, which a curve over single pixels breaks into pairs (figures: docs/xmsda/kernels.md, "Query order"). The
order is a function of the locations alone (a stable sort), so results stay bit-identical for any thread count.

Reference points: given `ref` (`[N, Q, L, 2]`), `loc` holds Deformable DETR's sampling offsets in pixels and each
location is computed in the coordinate phase as the module computes it, ref + offset / (W, H); the backward then
writes the offsets' gradient (the pixel-space gradient: d pixel / d offset = 1). With `ref` None, `loc` holds the
locations; numba compiles the two cases apart and prunes the unused branches, so neither pays for the other.

Half precision: bfloat16 and float16 inputs arrive as their bits (uint16, int16; see simd.py) and are widened to
float32 as they are read (`_real`, and the value rows in simd.py); the kernels compute in float32 into float32 outputs,
the dtype of `out` and `grad_value`, which the ops round to the input dtype.

Bilinear taps follow grid_sample (align_corners=False, zero padding): pixel coordinates x*W - 0.5, y*H - 0.5 (see
_pixel for the exact rounding); a corner outside the map reads zero and receives no gradient. Points whose four
corners are all inside take a fused path (in the backward, `simd.interior_corners_backward`); the rest test each
corner.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import interior_corners_backward
from .simd import real as _real

# numba keys its on-disk cache of the kernels below on this file's contents alone, not on those of simd.py, whose code
# they compile in: this digest of simd.py makes every change there a change here (test_kernel_cache_follows_simd_py).
SIMD_SOURCE_SHA256 = "369696a3e12aab115c422ca9ab6098483e9c38ec70bc22945fb3b3061e9a0eb6"

# Size of the per-thread stack buffers: bounds the channels per head (two accumulators of D) and L*P*2.
MAX_CHANNELS = 512
_STACK = 2 * MAX_CHANNELS

# FMA contraction, and reassociation so that the per-corner channel dot products of the backward vectorise.
# No 'nnan'/'ninf': non-finite values and weights must propagate as they do in grid_sample. (A non-finite location
# samples nothing, as in Deformable DETR's CUDA op, which skips a point unless -1 < pixel < size: see _cell.)
_FASTMATH = {"contract", "reassoc"}
_JIT = {"parallel": True, "cache": True, "fastmath": _FASTMATH, "nogil": True, "error_model": "numpy"}


@intrinsic
def _stack_alloca(typingctx, size, dtype):
    """Pointer to `size` elements allocated in the calling function's stack frame (entry block)."""
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=size.literal_value)

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@numba.njit(inline="always")
def _stack_buffer(dtype):
    return numba.carray(_stack_alloca(_STACK, dtype), _STACK)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@numba.njit(cache=True)  # no fastmath: every rounding below is deliberate
def _pixel(loc, half_size, one):
    """Pixel coordinate of a normalised location, rounded exactly as Deformable DETR's reference gets it: the grid
    2*loc - 1 in the input dtype, then ATen's CPU grid_sample unnormalisation fma(grid + 1, size/2, -1/2). Bilinear
    interpolation has a kink on every pixel centre, and points there are common (encoder reference points, the
    integer initial offsets): the same rounding puts them in the same cell, so the location gradients agree."""
    grid = (loc + loc) - one
    return _fma(grid + one, half_size, -(one / (one + one)))


@numba.njit(inline="always")
def _cell(pixel, i, limit, frac, cell):
    """The pixel cell floor(pixel) clamped to [-2, limit[i]] (-2 and `limit` mean no corner inside; NaN gives -2)
    into cell[i], the fraction into frac[i]."""
    t = frac.dtype.type
    f = np.floor(pixel)
    frac[i] = pixel - f
    f = f if f > t(-2) else t(-2)
    f = f if f < limit[i] else limit[i]
    cell[i] = np.int32(f)


@numba.njit(inline="always")
def _cells(loc, n, q, m, g, half_size, limit, one, frac, cell):
    """Phase 1 for one query: the cell and fraction (`_cell`) of each coordinate loc[n, q, m, g, i] (x, y
    interleaved). Branch-free over a contiguous run, so LLVM vectorises it."""
    for i in range(loc.shape[4]):
        _cell(_pixel(_real(loc[n, q, m, g, i]), half_size[i], one), i, limit, frac, cell)


@numba.njit(inline="always")
def _cells_from_offsets(offsets, base, n, q, m, g, half_size, limit, one, frac, cell):
    """`_cells` where `offsets` holds offsets in pixels of each level and the location is base[i] + offset / limit[i]
    (the reference point plus offset / (W, H), rounded as Deformable DETR's module does)."""
    for i in range(offsets.shape[4]):
        _cell(_pixel(base[i] + _real(offsets[n, q, m, g, i]) / limit[i], half_size[i], one), i, limit, frac, cell)


@numba.njit(inline="always")
def _reference_base(ref, n, q, lvl, levels, points, base):
    """The reference coordinate of each (x, y) entry of a query-head's offsets, which run over `levels` levels from
    `lvl` on, `points` points each: base[2 * (k * points + p) + c] = ref[n, q, lvl + k, c]."""
    for k in range(levels):
        x = _real(ref[n, q, lvl + k, 0])
        y = _real(ref[n, q, lvl + k, 1])
        for p in range(points):
            base[2 * (k * points + p)] = x
            base[2 * (k * points + p) + 1] = y


@numba.njit(inline="always")
def _point_levels(shapes, starts, first_level, points, count, one, heights, widths, offsets, limit, half_size):
    """For the `count` points of a query-head that run over the levels from `first_level` on, `points` per level:
    each point's level height, width and first row in S, and per coordinate (x, y interleaved) the map's size along
    it and half that (see `_cells`)."""
    t = type(one)
    for j in range(count):
        lvl = first_level + j // points
        heights[j] = shapes[lvl, 0]
        widths[j] = shapes[lvl, 1]
        offsets[j] = starts[lvl]
        limit[2 * j] = t(widths[j])
        limit[2 * j + 1] = t(heights[j])
        half_size[2 * j] = limit[2 * j] / (one + one)
        half_size[2 * j + 1] = limit[2 * j + 1] / (one + one)


@numba.njit(inline="always")
def _sampled(cell, heights, widths, j):
    """Whether point j of a query-head is sampled: its top-left cell (`_cell`) has a corner inside its level's map."""
    w0 = cell[2 * j]
    h0 = cell[2 * j + 1]
    return h0 >= -1 and w0 >= -1 and h0 < heights[j] and w0 < widths[j]


@numba.njit(inline="always")
def _corners(cell, frac, heights, widths, offsets, j, a, one):
    """The four bilinear corners of sampled point j, shared by the forward and the backward kernel: their weights
    times the attention weight `a` (top-left, top-right, bottom-left, bottom-right), the value rows r1 (top-left) and
    r3 = r1 + W (bottom-left), the fractions (lh, lw), and which sides of the cell are inside the map (top, bottom,
    left, right: a corner is inside where both of its sides are)."""
    w0 = cell[2 * j]
    h0 = cell[2 * j + 1]
    H = heights[j]
    W = widths[j]
    lw = frac[2 * j]
    lh = frac[2 * j + 1]
    c1 = a * (one - lh) * (one - lw)
    c2 = a * (one - lh) * lw
    c3 = a * lh * (one - lw)
    c4 = a * lh * lw
    r1 = offsets[j] + h0 * W + w0
    return c1, c2, c3, c4, r1, r1 + W, lh, lw, h0 >= 0, h0 < H - 1, w0 >= 0, w0 < W - 1


@numba.njit(inline="always")
def _spread_bits(v):
    """The low 16 bits of v moved to the even bit positions (Morton interleaving)."""
    v &= 0xFFFF
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    return (v | (v << 1)) & 0x55555555


@numba.njit(**_JIT)
def _query_keys(loc, shapes, ref, tile_bits):
    """`[N, Q]` uint64 sort keys for `query_order`: the Z-order code of each query's tile (2**tile_bits pixels of the
    finest level wide) in the high 32 bits, its index in the low 32. The keys are distinct, so any sort of them
    gives the stable order by code."""
    N, Q, M, _, P, _ = loc.shape
    width = np.float64(shapes[:, 1].max())
    height = np.float64(shapes[:, 0].max())
    keys = np.empty((N, Q), np.uint64)
    for task in numba.prange(N * Q):
        n = task // Q
        q = task % Q
        sx = 0.0
        sy = 0.0
        for m in range(M):
            for p in range(P):
                sx += _real(loc[n, q, m, 0, p, 0])
                sy += _real(loc[n, q, m, 0, p, 1])
        if ref is not None:
            sx = _real(ref[n, q, 0, 0]) * (M * P) + sx / shapes[0, 1]
            sy = _real(ref[n, q, 0, 1]) * (M * P) + sy / shapes[0, 0]
        x = sx / (M * P) * width
        y = sy / (M * P) * height
        x = x if x > 0.0 else 0.0  # also maps NaN to 0
        y = y if y > 0.0 else 0.0
        tx = np.int64(min(x, 65535.0)) >> tile_bits
        ty = np.int64(min(y, 65535.0)) >> tile_bits
        code = _spread_bits(tx) | (_spread_bits(ty) << 1)
        keys[n, q] = (np.uint64(code) << np.uint64(32)) | np.uint64(q)
    return keys


# Tiles of 16x16 pixels: 8 to 32 gave the backward the same gain over single pixels, 16 the best forward
# (docs/xmsda/kernels.md, "Query order").
QUERY_TILE_BITS = 4


def query_order(loc, shapes, ref, tile_bits=QUERY_TILE_BITS):
    """`[N, Q]` int64: each batch's queries sorted along a Z-order curve of the mean location of their first level's
    points, in square tiles 2**tile_bits pixels of the finest level wide (queries in one tile keep their original
    order). With reference points `ref` (`[N, Q, L, 2]`; None: `loc` holds locations), `loc` holds pixel offsets from
    them (see `_cells_from_offsets`).

    NumPy sorts the keys: a sort compiled into the kernel compiled slower and ran slower (docs/xmsda/kernels.md)."""
    if loc.shape[1] >= 2**32:
        raise ValueError(f"at most 2**32 - 1 queries, got {loc.shape[1]}")
    keys = _query_keys(loc, shapes, ref, tile_bits)
    keys.sort(axis=1)
    keys &= np.uint64(0xFFFFFFFF)  # the indices, below 2**32: the same bits as int64
    return keys.view(np.int64)


# Head sizes the forward kernel is compiled for as constants (see _make_forward_kernel); other sizes take the generic
# kernel. 32 is Deformable DETR's, DINO's and Mask2Former's (256 channels, 8 heads); 128 gained little and 16 lost
# (docs/xmsda/kernels.md, "Head sizes").
SPECIALISED_CHANNELS = (32, 64)


def _make_forward_kernel(channels):
    """The forward kernel for heads of `channels` channels, or for any head size if None.

    With the head size a compile-time constant (numba freezes closure variables), LLVM unrolls the channel loops and
    keeps the head's accumulator in registers instead of a stack buffer: one accumulator then beats the generic
    kernel's two interleaved ones (for heads of 32 channels or more; see SPECIALISED_CHANNELS)."""
    # Generic: even and odd points accumulate separately (two independent FMA chains through the stack);
    # specialised: one accumulator, in registers.
    accumulators = 2 if channels is None else 1

    @numba.njit(**_JIT)
    def forward_kernel(value, shapes, starts, loc, ref, attn, order, out, qblock):
        """out[n, q, m, :] = sum over (l, p) of attn * bilinear(value[n, m] at level l, loc); queries are visited
        in blocks of `qblock` in `order` (see query_order). With reference points `ref` (None: `loc` holds
        locations), `loc` holds offsets (see `_cells_from_offsets`). Numba compiles the two cases apart: the unused
        branch is pruned."""
        N, _, M, D = value.shape
        if channels is not None:
            D = channels
        Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        K = L * P
        t = out.dtype.type  # the compute dtype (value may hold bfloat16 or float16 bits: see _real)
        one = t(1)
        loc5 = loc.reshape(N, Q, M, 1, 2 * K)
        attn4 = attn.reshape(N, Q, M, K)
        nqb = (Q + qblock - 1) // qblock
        for task in numba.prange(N * nqb):
            n = task // nqb
            q_begin = (task % nqb) * qblock
            acc = _stack_buffer(out.dtype)
            frac = _stack_buffer(out.dtype)
            cell = _stack_buffer(np.int32)
            half_size = _stack_buffer(out.dtype)
            limit = _stack_buffer(out.dtype)
            base = _stack_buffer(out.dtype)
            heights = _stack_buffer(np.int64)
            widths = _stack_buffer(np.int64)
            offsets = _stack_buffer(np.int64)
            _point_levels(shapes, starts, 0, P, K, one, heights, widths, offsets, limit, half_size)
            for i in range(q_begin, min(Q, q_begin + qblock)):
                q = order[n, i]
                if ref is not None:
                    _reference_base(ref, n, q, 0, L, P, base)
                for m in range(M):
                    if ref is None:
                        _cells(loc5, n, q, m, 0, half_size, limit, one, frac, cell)
                    else:
                        _cells_from_offsets(loc5, base, n, q, m, 0, half_size, limit, one, frac, cell)
                    for d in range(accumulators * D):
                        acc[d] = 0
                    for j in range(K):
                        if not _sampled(cell, heights, widths, j):
                            continue
                        a = _real(attn4[n, q, m, j])
                        c1, c2, c3, c4, r1, r3, _, _, top, bottom, left, right = _corners(
                            cell, frac, heights, widths, offsets, j, a, one
                        )
                        o = (j % accumulators) * D
                        if top and bottom and left and right:
                            for d in range(D):
                                acc[o + d] += (
                                    c1 * _real(value[n, r1, m, d])
                                    + c2 * _real(value[n, r1 + 1, m, d])
                                    + c3 * _real(value[n, r3, m, d])
                                    + c4 * _real(value[n, r3 + 1, m, d])
                                )
                            continue
                        if top and left:
                            for d in range(D):
                                acc[o + d] += c1 * _real(value[n, r1, m, d])
                        if top and right:
                            for d in range(D):
                                acc[o + d] += c2 * _real(value[n, r1 + 1, m, d])
                        if bottom and left:
                            for d in range(D):
                                acc[o + d] += c3 * _real(value[n, r3, m, d])
                        if bottom and right:
                            for d in range(D):
                                acc[o + d] += c4 * _real(value[n, r3 + 1, m, d])
                    for d in range(D):
                        out[n, q, m, d] = acc[d] + acc[D + d] if accumulators == 2 else acc[d]

    return forward_kernel


FORWARD_KERNELS = {channels: _make_forward_kernel(channels) for channels in (None, *SPECIALISED_CHANNELS)}

# Forward tasks are handed out a few blocks at a time instead of one contiguous share per thread, so that when another
# process takes a core (a data loader, say) the other thread picks up the slack; on an idle machine it makes no
# difference (docs/xmsda/kernels.md). The backward's few, equal tasks gain nothing from it.
FORWARD_CHUNK = 4


def forward(value, shapes, starts, loc, ref, attn, order, out, qblock=64, generic=False):
    """The forward kernel for value's head size (the generic one if `generic`: for comparison), with
    FORWARD_CHUNK-sized dynamic scheduling."""
    kernel = FORWARD_KERNELS[None] if generic else FORWARD_KERNELS.get(value.shape[3], FORWARD_KERNELS[None])
    previous = numba.set_parallel_chunksize(FORWARD_CHUNK)
    try:
        kernel(value, shapes, starts, loc, ref, attn, order, out, qblock)
    finally:
        numba.set_parallel_chunksize(previous)


# How much longer the backward takes in all when each task is cut into this many slices of heads, measured on one
# thread (docs/xmsda/kernels.md, "Backward partition"): a slice uses only its heads' part of each pixel's value and
# gradient rows, so the rest of the lines the hardware fetches is wasted.
SLICE_COST = {1: 1.0, 2: 1.45, 4: 1.6, 8: 2.1}

# What one task over all the levels of an image costs, per level, against a task per level: it reads a query-head's
# output gradient once instead of once per level, and computes the cells of all its points in one vectorised loop
# (measured: docs/xmsda/kernels.md, "Backward partition").
ALL_LEVELS_COST = 0.85


def backward_partition(batch: int, levels: int, heads: int, threads: int) -> tuple[int, int]:
    """(level_block, slices) for `backward_kernel` on `threads` threads: tasks of one level or of all `levels`, each cut
    into `slices` slices of heads (SLICE_COST's counts, at most `heads`), whichever gives the shortest estimated run
    (rounds of tasks times each task's cost); on a tie fewer slices, then tasks of one level. On 2 threads an even
    number of images take one task each; one image is cut into its levels (one level alone into two slices). With
    more threads than tasks the tasks are cut, so that the extra threads get work. The results do not depend on the
    partition."""

    def estimate(plan):
        level_block, slices = plan
        tasks = batch * (levels // level_block) * slices
        per_level = 1.0 if level_block == 1 else ALL_LEVELS_COST
        return -(-tasks // threads) * level_block * per_level * SLICE_COST[slices] / slices

    plans = [(block, s) for block in sorted({1, levels}) for s in SLICE_COST if s <= max(1, heads)]
    return min(plans, key=lambda plan: (estimate(plan), plan[1], plan[0]))


@numba.njit(inline="always")
def _corner_backward(value, grad_value, g, n, row, m, c, s):
    """One in-frame corner on the edge path: returns s + <g, value[row]> and adds c * g to grad_value[row]
    (g is a stack buffer: only its first D entries are the head's gradient)."""
    D = value.shape[3]
    for d in range(D):
        s += g[d] * _real(value[n, row, m, d])
    for d in range(D):
        grad_value[n, row, m, d] += c * g[d]
    return s


@numba.njit(**_JIT)
def backward_kernel(
    value, shapes, starts, loc, ref, attn, order, grad_out, grad_value, grad_loc, grad_attn, level_block, slices
):
    """Gradients of forward_kernel, visiting the queries in `order`, in tasks of `level_block` levels (which divides
    L) of one image, each cut into `slices` slices of heads (`backward_partition`). `grad_value` has the layout of
    `value` and must start zeroed. With reference points `ref`, `loc` holds offsets in pixels and `grad_loc` receives
    their gradient."""
    N, _, M, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    if level_block < 1 or L % level_block != 0:
        raise ValueError("level_block must divide the number of levels")
    t = grad_value.dtype.type  # the compute dtype (value may hold half-precision bits: see simd.real)
    one = t(1)
    blocks = L // level_block
    K = level_block * P  # points per query-head in a task
    # Views with a task's levels as one run: its coordinates, weights and their gradients are contiguous.
    loc5 = loc.reshape(N, Q, M, blocks, 2 * K)
    attn5 = attn.reshape(N, Q, M, blocks, K)
    grad_loc5 = grad_loc.reshape(N, Q, M, blocks, 2 * K)
    grad_attn5 = grad_attn.reshape(N, Q, M, blocks, K)
    # Tasks own (batch, block of levels, slice of heads): disjoint parts of grad_value, since a level's value rows
    # are disjoint from every other level's. Heads are the inner loop, so the per-query tensors stream
    # contiguously. Each element of grad_value is accumulated in (order, point) order whatever the partition, so
    # results do not depend on it.
    per_slice = (M + slices - 1) // slices
    for task in numba.prange(N * blocks * slices):
        n = task // (blocks * slices)
        block = (task // slices) % blocks
        m_begin = (task % slices) * per_slice
        g = _stack_buffer(grad_value.dtype)
        frac = _stack_buffer(grad_value.dtype)
        cell = _stack_buffer(np.int32)
        half_size = _stack_buffer(grad_value.dtype)
        limit = _stack_buffer(grad_value.dtype)
        base = _stack_buffer(grad_value.dtype)
        heights = _stack_buffer(np.int64)
        widths = _stack_buffer(np.int64)
        offsets = _stack_buffer(np.int64)
        _point_levels(shapes, starts, block * level_block, P, K, one, heights, widths, offsets, limit, half_size)
        for i in range(Q):
            q = order[n, i]
            if ref is not None:
                _reference_base(ref, n, q, block * level_block, level_block, P, base)
            for m in range(m_begin, min(M, m_begin + per_slice)):
                if ref is None:
                    _cells(loc5, n, q, m, block, half_size, limit, one, frac, cell)
                else:
                    _cells_from_offsets(loc5, base, n, q, m, block, half_size, limit, one, frac, cell)
                for d in range(D):
                    g[d] = _real(grad_out[n, q, m, d])
                for j in range(K):
                    if not _sampled(cell, heights, widths, j):
                        grad_loc5[n, q, m, block, 2 * j] = 0
                        grad_loc5[n, q, m, block, 2 * j + 1] = 0
                        grad_attn5[n, q, m, block, j] = 0
                        continue
                    a = _real(attn5[n, q, m, block, j])
                    c1, c2, c3, c4, r1, r3, lh, lw, top, bottom, left, right = _corners(
                        cell, frac, heights, widths, offsets, j, a, one
                    )
                    # s_k = <grad_out, value at corner k>; corners outside contribute 0.
                    s1 = t(0)
                    s2 = t(0)
                    s3 = t(0)
                    s4 = t(0)
                    if top and bottom and left and right:
                        s1, s2, s3, s4 = interior_corners_backward(value, grad_value, g, n, r1, r3, m, c1, c2, c3, c4)
                    else:
                        if top and left:
                            s1 = _corner_backward(value, grad_value, g, n, r1, m, c1, s1)
                        if top and right:
                            s2 = _corner_backward(value, grad_value, g, n, r1 + 1, m, c2, s2)
                        if bottom and left:
                            s3 = _corner_backward(value, grad_value, g, n, r3, m, c3, s3)
                        if bottom and right:
                            s4 = _corner_backward(value, grad_value, g, n, r3 + 1, m, c4, s4)
                    # d(pixel)/d(input): a location moves the point W (H) pixels per unit, an offset one pixel per
                    # pixel
                    scale_x = limit[2 * j] if ref is None else one
                    scale_y = limit[2 * j + 1] if ref is None else one
                    grad_attn5[n, q, m, block, j] = (one - lh) * ((one - lw) * s1 + lw * s2) + lh * (
                        (one - lw) * s3 + lw * s4
                    )
                    grad_loc5[n, q, m, block, 2 * j] = a * scale_x * ((one - lh) * (s2 - s1) + lh * (s4 - s3))
                    grad_loc5[n, q, m, block, 2 * j + 1] = a * scale_y * ((one - lw) * (s3 - s1) + lw * (s4 - s2))
