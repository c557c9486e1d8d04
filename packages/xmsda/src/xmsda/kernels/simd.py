"""numba intrinsics in LLVM IR for the kernels in cpu.py: explicit 64-byte vector code for the backward kernel's
hottest block, and the widening of half-precision inputs to float32 as the kernels read them.

Why not a plain channel loop: LLVM vectorises `for d in range(D)` 64 floats per iteration (16 lanes, interleaved 4
times), so Deformable DETR's D=32 heads ran on its 8-lane remainder loop, with per-corner address setup, and each of
the four dot products of a point ended in its own horizontal reduction. Here one loop of 64-byte vectors (16 float32
or 8 float64 lanes) handles the four corners, the dot products share one transposed reduction, and the remainder
channels (D not a multiple of the lane count) run in scalar code: the backward kernel ~10% faster
(docs/xmsda/kernels.md). Every operation is a fused multiply-add or an addition in a fixed order, so results are
deterministic.

Half precision: NumPy, and so numba, has neither bfloat16 nor float16 (numba's CPU target cannot even load float16
arrays), so the ops hand the kernels those inputs as their bits, and the kernels widen each element (or vector of
them) exactly as they load it, instead of converting the inputs to float32 first (figures in ops._kernel_view).

numba's on-disk cache of the kernels in cpu.py is keyed on the contents of cpu.py alone (numba 0.68 hashes the
source file), not on this file's: cpu.py therefore holds this file's SHA-256 (SIMD_SOURCE_SHA256), which a test keeps
current, so that every change here changes cpu.py too and the kernels are compiled again.
"""

from __future__ import annotations

import llvmlite.ir as llir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I32 = llir.IntType(32)


# Half-precision inputs reach the kernels as their bits, NumPy (and so numba) having neither type: bfloat16 as
# uint16, float16 as int16. The kernels widen them to float32 as they read them (`real`, and the value rows here).
HALF_STORAGE = (types.uint16, types.int16)


def _widen(builder, bits, storage):
    """IR: half-precision bits (an i16 or a vector of them) as float32, exactly."""
    if isinstance(bits.type, llir.VectorType):
        count = bits.type.count
        i32, f32, half = (llir.VectorType(t, count) for t in (_I32, llir.FloatType(), llir.HalfType()))
        sixteen = llir.Constant(i32, [_I32(16)] * count)
    else:
        i32, f32, half, sixteen = _I32, llir.FloatType(), llir.HalfType(), _I32(16)
    if storage == types.uint16:  # a bfloat16 is the upper half of a float32
        return builder.bitcast(builder.shl(builder.zext(bits, i32), sixteen), f32)
    return builder.fpext(builder.bitcast(bits, half), f32)


@intrinsic
def real(typingctx, x):
    """An input element as a float: floats as they are, half-precision bits (HALF_STORAGE) widened to float32."""
    if isinstance(x, types.Float):
        return x(x), lambda context, builder, sig, args: args[0]
    if x not in HALF_STORAGE:
        return None
    return types.float32(x), lambda context, builder, sig, args: _widen(builder, args[0], x)


def _mask(indices):
    return llir.Constant(llir.VectorType(_I32, len(indices)), [_I32(i) for i in indices])


def _fold_pair(builder, x, y, lanes):
    """Two vectors of partial sums -> one: lanes [0, lanes/2) hold x's partials added pairwise, the rest y's."""
    half = lanes // 2
    lo = builder.shuffle_vector(x, y, _mask(list(range(half)) + list(range(lanes, lanes + half))))
    hi = builder.shuffle_vector(x, y, _mask(list(range(half, lanes)) + list(range(lanes + half, 2 * lanes))))
    return builder.fadd(lo, hi)


def _sum_four(builder, vectors, lanes):
    """The horizontal sums of four vectors, sharing their shuffles (a transposed reduction)."""
    ab = _fold_pair(builder, vectors[0], vectors[1], lanes)  # a in lanes [0, 2q), b in [2q, 4q)
    cd = _fold_pair(builder, vectors[2], vectors[3], lanes)
    q = lanes // 4
    lo = list(range(q)) + list(range(2 * q, 3 * q)) + list(range(lanes, lanes + q))
    lo += list(range(lanes + 2 * q, lanes + 3 * q))
    x = builder.fadd(
        builder.shuffle_vector(ab, cd, _mask(lo)),
        builder.shuffle_vector(ab, cd, _mask([i + q for i in lo])),
    )  # four groups of q lanes: a, b, c, d
    width = q
    while width > 1:  # rotate-and-add within each group until every lane holds its group's sum
        step = width // 2
        rotated = [(i // width) * width + (i % width + step) % width for i in range(lanes)]
        x = builder.fadd(x, builder.shuffle_vector(x, x, _mask(rotated)))
        width = step
    return [builder.extract_element(x, _I32(k * q)) for k in range(4)]


@intrinsic
def interior_corners_backward(typingctx, value, grad_value, g, n, r1, r3, m, c1, c2, c3, c4):
    """For a point whose four corners are inside the map: returns (s1, s2, s3, s4), the dot products of the head's
    output gradient `g` (a 1-D buffer) with value[n, row, m, :] for row = r1, r1 + 1, r3, r3 + 1, and adds
    c_k * g to the same rows of grad_value. `value` and `grad_value` are C-contiguous `[N, S, M, D]` arrays; `value`
    may hold half-precision bits (HALF_STORAGE) with float32 `grad_value` and `g`."""
    dtype = grad_value.dtype
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (value, grad_value, g)):
        return None  # the vector loads need contiguous channels
    if dtype not in (types.float32, types.float64) or g.dtype != dtype:
        return None
    if value.dtype != dtype and not (value.dtype in HALF_STORAGE and dtype == types.float32):
        return None
    storage = value.dtype
    result = types.UniTuple(dtype, 4)

    def codegen(context, builder, sig, args):
        value_ty, grad_ty, g_ty = sig.args[:3]
        value_arr = context.make_array(value_ty)(context, builder, args[0])
        grad_arr = context.make_array(grad_ty)(context, builder, args[1])
        g_ptr = context.make_array(g_ty)(context, builder, args[2]).data
        intp = context.get_value_type(types.intp)
        n_, r1_, r3_, m_ = (
            context.cast(builder, a, t, types.intp) for a, t in zip(args[3:7], sig.args[3:7], strict=True)
        )
        coefficients = [context.cast(builder, a, t, dtype) for a, t in zip(args[7:], sig.args[7:], strict=True)]
        rows = [r1_, builder.add(r1_, intp(1)), r3_, builder.add(r3_, intp(1))]
        channels = cgutils.unpack_tuple(builder, value_arr.shape, 4)[3]
        element = context.get_value_type(dtype)
        itemsize = context.get_abi_sizeof(element)
        lanes = 64 // itemsize
        vector = llir.VectorType(element, lanes)
        bits = itemsize * 8
        fma_vector = cgutils.get_or_insert_function(
            builder.module, llir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f{bits}"
        )
        fma_scalar = cgutils.get_or_insert_function(
            builder.module, llir.FunctionType(element, [element] * 3), f"llvm.fma.f{bits}"
        )

        def row_pointer(ty, arr, row):
            return cgutils.get_item_pointer(context, builder, ty, arr, [n_, row, m_, intp(0)])

        value_rows = [row_pointer(value_ty, value_arr, r) for r in rows]
        grad_rows = [row_pointer(grad_ty, grad_arr, r) for r in rows]

        def vector_at(pointer, offset, element=element):
            return builder.bitcast(builder.gep(pointer, [offset]), llir.VectorType(element, lanes).as_pointer())

        def value_at(k, offset):  # a vector of value row k's channels from `offset`, as `dtype`
            if storage == dtype:
                return builder.load(vector_at(value_rows[k], offset), align=itemsize)
            bits = builder.load(vector_at(value_rows[k], offset, context.get_value_type(storage)), align=2)
            return _widen(builder, bits, storage)

        def scalar_at(k, d):
            v = builder.load(builder.gep(value_rows[k], [d]))
            return v if storage == dtype else _widen(builder, v, storage)

        undef = llir.Constant(vector, llir.Undefined)
        splat = llir.Constant(llir.VectorType(_I32, lanes), None)
        coefficient_vectors = [
            builder.shuffle_vector(builder.insert_element(undef, c, _I32(0)), undef, splat) for c in coefficients
        ]
        sums = [cgutils.alloca_once_value(builder, llir.Constant(vector, None)) for _ in range(4)]
        chunks = builder.udiv(channels, intp(lanes))
        with cgutils.for_range(builder, chunks) as loop:
            offset = builder.mul(loop.index, intp(lanes))
            g_vector = builder.load(vector_at(g_ptr, offset), align=itemsize)
            for k in range(4):
                v = value_at(k, offset)
                builder.store(builder.call(fma_vector, [g_vector, v, builder.load(sums[k])]), sums[k])
            for k in range(4):
                target = vector_at(grad_rows[k], offset)
                grad = builder.load(target, align=itemsize)
                builder.store(
                    builder.call(fma_vector, [coefficient_vectors[k], g_vector, grad]), target, align=itemsize
                )
        totals = [
            cgutils.alloca_once_value(builder, s) for s in _sum_four(builder, [builder.load(s) for s in sums], lanes)
        ]
        remainder = builder.mul(chunks, intp(lanes))
        with cgutils.for_range_slice(builder, remainder, channels, intp(1), inc=True) as (d, _):
            g_d = builder.load(builder.gep(g_ptr, [d]))
            for k in range(4):
                v = scalar_at(k, d)
                builder.store(builder.call(fma_scalar, [g_d, v, builder.load(totals[k])]), totals[k])
            for k in range(4):
                target = builder.gep(grad_rows[k], [d])
                builder.store(builder.call(fma_scalar, [coefficients[k], g_d, builder.load(target)]), target)
        return context.make_tuple(builder, result, [builder.load(t) for t in totals])

    return result(value, grad_value, g, n, r1, r3, m, c1, c2, c3, c4), codegen
