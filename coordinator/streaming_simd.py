"""Vector helpers of the bucket close (:mod:`coordinator.streaming_buckets`), written as LLVM
intrinsics through numba: a cache-line prefetch, a trailing-zero count, an eight-lane float
range compare into a bit mask, and a sixteen-lane compress that splits keys around a pivot.

The intrinsics used (``llvm.prefetch``, ``llvm.cttz``, vector ``fcmp``,
``llvm.experimental.vector.compress`` or ``llvm.masked.compressstore``, ``llvm.ctpop``) are
target-independent: LLVM lowers them to the processor's instructions where it has them
(``vcmpps`` / ``vmovmskps``, ``vpcompressd`` with AVX-512) and to plain code elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, types
from numba.extending import intrinsic


def _splat16(builder: Any, value: Any) -> Any:
    """A 16-lane int32 vector with every lane ``value`` (truncated to int32)."""
    i32 = ir.IntType(32)
    v16 = ir.VectorType(i32, 16)
    if value.type != i32:
        value = builder.trunc(value, i32)
    one = builder.insert_element(ir.Constant(v16, ir.Undefined), value, i32(0))
    return builder.shuffle_vector(one, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16))


def _prefetch_typer(typingctx: Any, arr: Any, index: Any) -> Any:
    """Hint the processor to load ``arr[index]``'s cache line (``llvm.prefetch``, read, into
    all cache levels): the rows of a tile are far apart in memory, which the hardware
    prefetcher does not anticipate."""
    sig = types.void(arr, index)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        )
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _trailing_zeros_typer(typingctx: Any, word: Any) -> Any:
    """Number of trailing zero bits of a nonzero uint64 (``llvm.cttz``)."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic(
            "llvm.cttz", [i64], fnty=ir.FunctionType(i64, [i64, ir.IntType(1)])
        )
        return builder.call(fn, [args[0], ir.IntType(1)(1)])

    return sig, codegen


def _inside8_typer(typingctx: Any, row: Any, low: Any, high: Any, off: Any) -> Any:
    """Bits ``u = 0..7`` set where ``low[off + u] <= row[off + u] <= high[off + u]`` (three
    contiguous float32 arrays, eight elements each from ``off``): one vector compare of eight
    lanes and a move of their sign bits (``vcmpps`` / ``vmovmskps`` on x86-64)."""
    sig = types.uint64(row, low, high, off)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        vec = ir.VectorType(ir.FloatType(), 8)

        def load(aty: Any, arr: Any) -> Any:
            ary = context.make_array(aty)(context, builder, arr)
            ptr = builder.gep(ary.data, [args[3]])
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

        v = load(signature.args[0], args[0])
        ge = builder.fcmp_ordered(">=", v, load(signature.args[1], args[1]))
        le = builder.fcmp_ordered("<=", v, load(signature.args[2], args[2]))
        lanes = builder.bitcast(builder.and_(ge, le), ir.IntType(8))
        return builder.zext(lanes, ir.IntType(64))

    return sig, codegen


def _equal64_typer(typingctx: Any, a: Any, ia: Any, b: Any, ib: Any) -> Any:
    """Bits ``u = 0..63`` set where ``a[ia + u] == b[ib + u]`` (two contiguous uint8 arrays,
    64 elements each from the offsets): one 64-lane byte compare into a mask (``vpcmpeqb``
    into a mask register with AVX-512BW, two ``vpcmpeqb`` / ``vpmovmskb`` with AVX2)."""
    sig = types.uint64(a, ia, b, ib)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        vec = ir.VectorType(ir.IntType(8), 64)

        def load(k: int) -> Any:
            ary = context.make_array(signature.args[k])(context, builder, args[k])
            ptr = builder.gep(ary.data, [args[k + 1]])
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=1)

        same = builder.icmp_unsigned("==", load(0), load(2))
        return builder.bitcast(same, ir.IntType(64))

    return sig, codegen


def _within16_typer(typingctx: Any, src: Any, off: Any, low: Any, high: Any) -> Any:
    """Bits ``u = 0..15`` set where ``low <= src[off + u] <= high`` (int32 keys, signed): one
    16-lane compare pair into a mask. ``src`` must be readable 16 elements from ``off``."""
    sig = types.uint64(src, off, low, high)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        v16 = ir.VectorType(i32, 16)

        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        v = builder.load(builder.bitcast(ptr, v16.as_pointer()), align=4)
        ge = builder.icmp_signed(">=", v, _splat16(builder, args[2]))
        le = builder.icmp_signed("<=", v, _splat16(builder, args[3]))
        lanes = builder.bitcast(builder.and_(ge, le), ir.IntType(16))
        return builder.zext(lanes, ir.IntType(64))

    return sig, codegen


def _sorter(lanes: int) -> Any:
    """Typer of an in-place ascending sort of ``buf[:lanes]`` (int32, signed) in vector
    registers: a bitonic network of ``log2(lanes) (log2(lanes) + 1) / 2`` compare-exchange
    stages, each a lane permutation, a min, a max and a blend (no branches, no memory in
    between)."""

    def typer(typingctx: Any, buf: Any) -> Any:
        sig = types.void(buf)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i32 = ir.IntType(32)
            vec = ir.VectorType(i32, lanes)
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.bitcast(ary.data, vec.as_pointer())
            v = builder.load(ptr, align=4)
            undef = ir.Constant(vec, ir.Undefined)
            k = 2
            while k <= lanes:
                j = k // 2
                while j >= 1:
                    other = builder.shuffle_vector(
                        v, undef, ir.Constant(vec, [u ^ j for u in range(lanes)])
                    )
                    less = builder.icmp_signed("<", v, other)
                    low = builder.select(less, v, other)
                    high = builder.select(less, other, v)
                    take_low = [((u & j) == 0) == ((u & k) == 0) for u in range(lanes)]
                    keep = ir.Constant(
                        ir.VectorType(ir.IntType(1), lanes), [int(t) for t in take_low]
                    )
                    v = builder.select(keep, low, high)
                    j //= 2
                k *= 2
            builder.store(v, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return typer


def _popcount_typer(typingctx: Any, word: Any) -> Any:
    """Number of set bits of a uint64 (``llvm.ctpop``)."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [args[0]])

    return sig, codegen


#: Whether LLVM has ``llvm.experimental.vector.compress`` (LLVM 19 and later): a compress into a
#: register and a plain store, faster than ``llvm.masked.compressstore`` on some processors.
_VECTOR_COMPRESS = llvm_version_info >= (19,)


def _split16_typer(
    typingctx: Any,
    src: Any,
    off: Any,
    count: Any,
    pivot: Any,
    left: Any,
    nl: Any,
    right: Any,
    nr: Any,
) -> Any:
    """Of the first ``count`` (at most 16) keys of ``src[off:]``, those ``< pivot`` are packed
    in order to ``left[nl:]`` and the others to ``right[nr:]``; returns how many went left.

    One 16-lane compare and two compresses (``vpcompressd`` with AVX-512). All 16 lanes of
    ``src[off:]`` are loaded, and with LLVM 19 or later all 16 lanes are stored at
    ``left[nl:]`` and ``right[nr:]``: the three arrays need 16 elements of slack past their
    used part (the lanes past ``count`` are ignored, the stored lanes past the packed ones are
    overwritten or never read)."""
    sig = types.int64(src, off, count, pivot, left, nl, right, nr)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        v16 = ir.VectorType(i32, 16)
        b16 = ir.VectorType(ir.IntType(1), 16)

        def ptr(k: int, idx: Any) -> Any:
            ary = context.make_array(signature.args[k])(context, builder, args[k])
            return builder.gep(ary.data, [idx])

        v = builder.load(builder.bitcast(ptr(0, args[1]), v16.as_pointer()), align=4)
        lanes = ir.Constant(v16, list(range(16)))
        valid = builder.icmp_signed("<", lanes, _splat16(builder, args[2]))
        below = builder.icmp_signed("<", v, _splat16(builder, args[3]))
        to_left = builder.and_(below, valid)
        to_right = builder.and_(builder.not_(below), valid)
        module = builder.module
        if _VECTOR_COMPRESS:
            name = "llvm.experimental.vector.compress.v16i32"
            fn = module.globals.get(name) or ir.Function(
                module, ir.FunctionType(v16, [v16, b16, v16]), name
            )
            undef = ir.Constant(v16, ir.Undefined)
            for mask, k, at in ((to_left, 4, args[5]), (to_right, 6, args[7])):
                packed = builder.call(fn, [v, mask, undef])
                builder.store(packed, builder.bitcast(ptr(k, at), v16.as_pointer()), align=4)
        else:
            name = "llvm.masked.compressstore.v16i32"
            fn = module.globals.get(name) or ir.Function(
                module, ir.FunctionType(ir.VoidType(), [v16, ir.PointerType(i32), b16]), name
            )
            builder.call(fn, [v, ptr(4, args[5]), to_left])
            builder.call(fn, [v, ptr(6, args[7]), to_right])
        popcount = module.declare_intrinsic("llvm.ctpop", [ir.IntType(16)])
        n = builder.call(popcount, [builder.bitcast(to_left, ir.IntType(16))])
        return builder.zext(n, ir.IntType(64))

    return sig, codegen


prefetch: Any = intrinsic(_prefetch_typer)
split16: Any = intrinsic(_split16_typer)
trailing_zeros: Any = intrinsic(_trailing_zeros_typer)
inside8: Any = intrinsic(_inside8_typer)
equal64: Any = intrinsic(_equal64_typer)
popcount: Any = intrinsic(_popcount_typer)
within16: Any = intrinsic(_within16_typer)
sort16: Any = intrinsic(_sorter(16))
sort32: Any = intrinsic(_sorter(32))
sort64: Any = intrinsic(_sorter(64))
sort128: Any = intrinsic(_sorter(128))
sort256: Any = intrinsic(_sorter(256))


@njit(nogil=True, cache=True)
def sort_padded(buf: np.ndarray, size: int) -> int:
    """Sort ``buf[:size]`` (int32, ``size <= 256``) ascending in vector registers: padded with
    the greatest int32 up to the next of 16, 32, 64, 128 or 256 lanes (``buf`` must hold that
    many), which are returned."""
    if size <= 16:
        lanes = 16
    elif size <= 32:
        lanes = 32
    elif size <= 64:
        lanes = 64
    elif size <= 128:
        lanes = 128
    else:
        lanes = 256
    for t in range(size, lanes):
        buf[t] = np.int32(2**31 - 1)
    if lanes == 16:
        sort16(buf)
    elif lanes == 32:
        sort32(buf)
    elif lanes == 64:
        sort64(buf)
    elif lanes == 128:
        sort128(buf)
    else:
        sort256(buf)
    return lanes
