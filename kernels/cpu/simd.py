"""Explicit 16-lane vector code for the descriptor kernels (numba intrinsics).

The kernels keep a chunk's density coefficients centre-minor, At[s, q, k] (species, nlm
entry, centre), and process a block of 64 pair slots as 4 rows of 16 lanes, lane = one
centre (see descriptors.py, "Implementation").  Moving a block's 55 x 64 contributions
into At is then, per nlm entry q and species s, one 16-wide multiply-add of each row with
that row's species mask.  LLVM does not vectorise those 16-wide loops by itself: it
unrolls them fully and cannot prove that At does not alias the block's arrays, so the
code stays scalar.  These intrinsics emit the vector loads, FMAs and stores directly and
keep the S x 4 mask vectors in registers over the loop on q.

All arrays are C-contiguous, of one float dtype; no bounds checks (the callers' shapes
guarantee them).  ``S`` must be an integer literal (the kernels dispatch on it).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

W = 16  # lanes
ROWS = 4  # rows of a 64-slot block


def _setup(context, builder, sig, args):
    arys = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
            for t, a in zip(sig.args, args)]
    dtype = next(t.dtype for t in sig.args if isinstance(t, types.Array))
    elem = context.get_value_type(dtype)
    vec = ir.VectorType(elem, W)
    size = context.get_abi_sizeof(elem)
    name = "llvm.fma.v%df%d" % (W, 8 * size)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)

    def ptr(ary, off):
        return builder.bitcast(builder.gep(ary.data, [off]), vec.as_pointer())

    def load(ary, off):
        return builder.load(ptr(ary, off), align=size)

    def store(val, ary, off):
        builder.store(val, ptr(ary, off), align=size)

    return arys, vec, fma, load, store


def _check(arrays, S):
    if not isinstance(S, types.IntegerLiteral):
        return False
    dt = arrays[0].dtype
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == dt
               and isinstance(dt, types.Float) for a in arrays)


@intrinsic
def lanes_scatter(typingctx, At, o, C, M, S):
    """At[s, q, o:o+16] += sum_r C[q, 16r:16r+16] * M[s, 16r:16r+16] for every q, s < S.

    At (S, n_nlm, width); C (n_nlm, 64); M (S, 64)."""
    if not _check((At, C, M), S):
        return None
    n_s = S.literal_value
    sig = types.void(At, o, C, M, S)

    def codegen(context, builder, signature, args):
        (at, _, c, m, _), vec, fma, load, store = _setup(context, builder, signature, args)
        intp = context.get_value_type(types.intp)
        i = lambda v: ir.Constant(intp, v)  # noqa: E731
        _, n_nlm, width = cgutils.unpack_tuple(builder, at.shape, 3)
        off0 = builder.sext(args[1], intp) if args[1].type != intp else args[1]
        mv = [[load(m, i(s * W * ROWS + r * W)) for r in range(ROWS)] for s in range(n_s)]
        plane = builder.mul(n_nlm, width)
        with cgutils.for_range(builder, n_nlm) as loop:
            q = loop.index
            cv = [load(c, builder.add(builder.mul(q, i(W * ROWS)), i(r * W))) for r in range(ROWS)]
            row = builder.add(builder.mul(q, width), off0)
            for s in range(n_s):
                off = builder.add(builder.mul(i(s), plane), row)
                acc = load(at, off)
                for r in range(ROWS):
                    acc = builder.call(fma, [cv[r], mv[s][r], acc])
                store(acc, at, off)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_gather(typingctx, AbT, o, M, Ab, S, accumulate):
    """Ab[q, 16r:16r+16] (+)= sum_s M[s, 16r:16r+16] * AbT[s, q, o:o+16] for every q, r.

    AbT (S, n_nlm, width); M (S, 64); Ab (n_nlm, 64); ``accumulate`` a boolean literal."""
    if not _check((AbT, M, Ab), S) or not isinstance(accumulate, types.BooleanLiteral):
        return None
    n_s = S.literal_value
    add = accumulate.literal_value
    sig = types.void(AbT, o, M, Ab, S, accumulate)

    def codegen(context, builder, signature, args):
        (abt, _, m, ab, _, _), vec, fma, load, store = _setup(context, builder, signature, args)
        intp = context.get_value_type(types.intp)
        i = lambda v: ir.Constant(intp, v)  # noqa: E731
        _, n_nlm, width = cgutils.unpack_tuple(builder, abt.shape, 3)
        off0 = builder.sext(args[1], intp) if args[1].type != intp else args[1]
        mv = [[load(m, i(s * W * ROWS + r * W)) for r in range(ROWS)] for s in range(n_s)]
        plane = builder.mul(n_nlm, width)
        with cgutils.for_range(builder, n_nlm) as loop:
            q = loop.index
            row = builder.add(builder.mul(q, width), off0)
            av = [load(abt, builder.add(builder.mul(i(s), plane), row)) for s in range(n_s)]
            for r in range(ROWS):
                off = builder.add(builder.mul(q, i(W * ROWS)), i(r * W))
                acc = load(ab, off) if add else ir.Constant(vec, None)
                for s in range(n_s):
                    acc = builder.call(fma, [av[s], mv[s][r], acc])
                store(acc, ab, off)
        return context.get_dummy_value()

    return sig, codegen
