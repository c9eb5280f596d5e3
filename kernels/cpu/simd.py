"""Explicit 16-lane vector code for the descriptor kernels (numba intrinsics).

The kernels keep a chunk's density coefficients centre-minor, At[s, q, k] (species, nlm
entry, centre), and process a block of 64 pair slots as 4 rows of 16 lanes, lane = one
centre (see descriptors.py, "Implementation").  Moving a block's 55 x 64 contributions
into At is then, per nlm entry q and species s, one 16-wide multiply-add of each row with
that row's species mask.  LLVM does not vectorise those 16-wide loops by itself: it
unrolls them fully and cannot prove that At does not alias the block's arrays, so the
code stays scalar.  These intrinsics emit the vector loads, FMAs and stores directly and
keep the S x 4 mask vectors in registers over the loop on q.  The scatter forms each
contribution row as a product of a radial row and an angular row (g_nl Y_lm, or two such
products in the jvp) in registers: writing the 55 x 64 products to a block and reading
them back cost ~8% of the float32 forward pass.  The per-centre contractions of a work
item (the power spectrum, its jvp, the vjp's A_bar) keep their sums over the species
pairs in registers the same way (``lanes_power_spectrum``, ``lanes_abar``).

All arrays are C-contiguous, of one float dtype; no bounds checks (the callers' shapes
guarantee them).  ``S``, the species count, must be at most ``MAX_SPECIES`` (the
callers take a plain loop above it).
"""
from __future__ import annotations

from types import SimpleNamespace

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

W = 16  # lanes
ROWS = 4  # rows of a 64-slot block


def _tools(context, builder, dtype):
    """Vector codegen helpers for W-lane vectors of ``dtype``, shared by the intrinsics:
    vec, size (bytes per element), fma, const(int), as_intp, ptr/load/store (array, offset in
    elements; unaligned beyond the element)."""
    elem = context.get_value_type(dtype)
    vec = ir.VectorType(elem, W)
    size = context.get_abi_sizeof(elem)
    name = "llvm.fma.v%df%d" % (W, 8 * size)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
    intp = context.get_value_type(types.intp)

    def ptr(ary, off):
        return builder.bitcast(builder.gep(ary.data, [off]), vec.as_pointer())

    def load(ary, off):
        return builder.load(ptr(ary, off), align=size)

    def store(val, ary, off):
        builder.store(val, ptr(ary, off), align=size)

    def const(v):
        return ir.Constant(intp, v)

    def as_intp(v):
        return v if v.type == intp else builder.sext(v, intp)

    return SimpleNamespace(vec=vec, size=size, fma=fma, const=const, as_intp=as_intp, ptr=ptr,
                           load=load, store=store)


def _setup(context, builder, sig, args, lanes, masks, n_s):
    """Codegen state of the lane scatter / gather: ``lanes`` and ``masks`` are the argument
    positions of the (S, n_nlm, width) lane array and of the (S, 64) masks, argument 1 the
    lane offset o.  The masks' S x ROWS vectors are loaded here, before any loop."""
    arys = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
            for t, a in zip(sig.args, args)]
    g = _tools(context, builder, sig.args[lanes].dtype)
    _, n_nlm, width = cgutils.unpack_tuple(builder, arys[lanes].shape, 3)
    m = arys[masks]
    g.mv = [[g.load(m, g.const(s * W * ROWS + r * W)) for r in range(ROWS)] for s in range(n_s)]
    g.arys, g.n_nlm, g.width, g.o = arys, n_nlm, width, g.as_intp(args[1])
    g.plane = builder.mul(n_nlm, width)
    return g


MAX_SPECIES = 6  # the species counts the vector code is generated for (callers check)


def _species_cases(builder, S, body):
    """Emit ``body(n_s)`` once per species count n_s = 1 .. MAX_SPECIES behind a switch on
    the run-time S: the S x 4 masks and the S rows of a q must be distinct registers, so
    each count gets its own straight-line code; S outside that range does nothing."""
    end = builder.append_basic_block("species.end")
    sw = builder.switch(S, end)
    for n_s in range(1, MAX_SPECIES + 1):
        bb = builder.append_basic_block("species.%d" % n_s)
        sw.add_case(ir.Constant(S.type, n_s), bb)
        with builder.goto_block(bb):
            body(n_s)
            builder.branch(end)
    builder.position_at_end(end)


def _check(arrays, S):
    if not isinstance(S, types.Integer):
        return False
    dt = arrays[0].dtype
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == dt
               and isinstance(dt, types.Float) for a in arrays)


def _scatter_loop(builder, g, at, rows, n_terms):
    """At[s, q, o:o+16] += sum_r rows(q)[r] * M[s, 16r:16r+16] for every q, s.

    A mask is 1 or 0, so each term is added either as an FMA with the float mask or as an
    add under the mask's bit (bitwise the same sum).  All FMAs would keep the FMA pipes
    busy (the products themselves need them too) while the add pipes idle; the terms are
    split so that both carry about the same number of operations."""
    i = g.const
    n_s = len(g.mv)
    n_mul = n_terms * 2 - 1  # multiplies / FMAs forming one row's contribution
    n_add = (n_s * ROWS + n_mul * ROWS + 1) // 2
    zero = ir.Constant(g.vec, None)
    # the last n_add (s, r) terms go to the add pipes: their bit masks, hoisted
    plan = [[(s * ROWS + r) >= n_s * ROWS - n_add for r in range(ROWS)] for s in range(n_s)]
    kv = [[builder.fcmp_unordered("une", g.mv[s][r], zero) if plan[s][r] else None
           for r in range(ROWS)] for s in range(n_s)]
    with cgutils.for_range(builder, g.n_nlm) as loop:
        q = loop.index
        cv = rows(q)
        row = builder.add(builder.mul(q, g.width), g.o)
        for s in range(n_s):
            off = builder.add(builder.mul(i(s), g.plane), row)
            acc = g.load(at, off)
            for r in range(ROWS):
                if plan[s][r]:
                    acc = builder.select(kv[s][r], builder.fadd(acc, cv[r]), acc)
                else:
                    acc = builder.call(g.fma, [cv[r], g.mv[s][r], acc])
            g.store(acc, at, off)


def _block_rows(builder, g, ary, k):
    """The ROWS vectors of row k of a (n, 64) block array."""
    base = builder.mul(k, g.const(W * ROWS))
    return [g.load(ary, builder.add(base, g.const(r * W))) for r in range(ROWS)]


def _index(builder, g, idx, q):
    v = builder.load(builder.gep(idx.data, [q]))
    return v if v.type == q.type else builder.sext(v, q.type)


@intrinsic
def lanes_scatter_products(typingctx, At, o, blocks, ci, cj, M, S):
    """At[s, q, o:o+16] += sum_r C[q, 16r:+16] M[s, 16r:+16] with C[q] = sum_t P_t[ci[q]]
    Q_t[cj[q]] over the pairs blocks = (P_0, Q_0, P_1, Q_1, ...) of (n, 64) blocks (the
    second term onwards by FMA), the products formed in registers instead of in a C block
    written and read back.

    At (S, n_nlm, width); blocks a tuple of 2 or 4 arrays; ci, cj (n_nlm,) integer; M (S, 64)."""
    if not (isinstance(blocks, types.UniTuple) and blocks.count in (2, 4)
            and _check((At, blocks.dtype, M), S) and all(
                isinstance(a, types.Array) and isinstance(a.dtype, types.Integer)
                and a.layout == "C" for a in (ci, cj))):
        return None
    n_terms = blocks.count // 2
    sig = types.void(At, o, blocks, ci, cj, M, S)

    def emit(context, builder, signature, args, n_s):
        g = _setup(context, builder, signature, args, 0, 5, n_s)
        arys = [context.make_array(blocks.dtype)(context, builder, v)
                for v in cgutils.unpack_tuple(builder, args[2], blocks.count)]
        ia, ja = g.arys[3], g.arys[4]

        def rows(q):
            i, j = _index(builder, g, ia, q), _index(builder, g, ja, q)
            acc = None
            for t in range(n_terms):
                a = _block_rows(builder, g, arys[2 * t], i)
                b = _block_rows(builder, g, arys[2 * t + 1], j)
                acc = ([builder.fmul(x, y) for x, y in zip(a, b)] if acc is None else
                       [builder.call(g.fma, [x, y, z]) for x, y, z in zip(a, b, acc)])
            return acc

        _scatter_loop(builder, g, g.arys[0], rows, n_terms)

    def codegen(context, builder, signature, args):
        _species_cases(builder, args[6],
                       lambda n_s: emit(context, builder, signature, args, n_s))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_gather(typingctx, AbT, o, M, Ab, S, accumulate):
    """Ab[q, 16r:16r+16] (+)= sum_s M[s, 16r:16r+16] * AbT[s, q, o:o+16] for every q, r.

    AbT (S, n_nlm, width); M (S, 64); Ab (n_nlm, 64); ``accumulate`` a boolean (Ab's old
    values are added when true, ignored otherwise)."""
    if not _check((AbT, M, Ab), S) or not isinstance(accumulate, types.Boolean):
        return None
    sig = types.void(AbT, o, M, Ab, S, types.boolean)

    def emit(context, builder, signature, args, n_s):
        g = _setup(context, builder, signature, args, 0, 2, n_s)
        abt, ab = g.arys[0], g.arys[3]
        i = g.const
        add = builder.icmp_unsigned("!=", args[5], ir.Constant(args[5].type, 0))
        with cgutils.for_range(builder, g.n_nlm) as loop:
            q = loop.index
            row = builder.add(builder.mul(q, g.width), g.o)
            av = [g.load(abt, builder.add(builder.mul(i(s), g.plane), row)) for s in range(n_s)]
            for r in range(ROWS):
                off = builder.add(builder.mul(q, i(W * ROWS)), i(r * W))
                acc = builder.select(add, g.load(ab, off), ir.Constant(g.vec, None))
                for s in range(n_s):
                    acc = builder.call(g.fma, [av[s], g.mv[s][r], acc])
                g.store(acc, ab, off)

    def codegen(context, builder, signature, args):
        _species_cases(builder, args[4],
                       lambda n_s: emit(context, builder, signature, args, n_s))
        return context.get_dummy_value()

    return sig, codegen


# Lanes <-> rows: the per-centre outputs (X, X_dot) are rows X[i, f] of the centres i, the
# contractions produce them lane-major, Xt[f, k] for the 64 lanes k of a work item (and the
# vjp needs X_bar lane-major).  A scalar loop over the 64 lanes per feature stores (loads)
# one element per instruction at 64 different rows; these move 16 x 16 tiles through
# registers, transposed by shuffles, with one 16-wide store (load) per row.


def _transpose(builder, rows):
    """rows[i][j] -> rows[j][i] for W vectors of W elements: at each stage d, bit d of the
    row and the column index are swapped in the off-diagonal d x d blocks."""
    i32 = ir.IntType(32)
    n = len(rows)
    d = n // 2
    while d:
        new = list(rows)
        lo = ir.Constant(ir.VectorType(i32, n), [j if not j & d else n + j - d for j in range(n)])
        hi = ir.Constant(ir.VectorType(i32, n), [j + d if not j & d else n + j for j in range(n)])
        for i in range(n):
            if not i & d:
                new[i] = builder.shuffle_vector(rows[i], rows[i + d], lo)
                new[i + d] = builder.shuffle_vector(rows[i], rows[i + d], hi)
        rows = new
        d //= 2
    return rows


def _tiles_codegen(context, builder, sig, args, to_rows):
    """Shared by lanes_to_rows / rows_to_lanes: args (lane array Xt (F, 64), order, c0, nc,
    row array X (N, F)) in either order of the two arrays."""
    lanes_i, rows_i = (0, 4) if to_rows else (4, 0)
    xt = context.make_array(sig.args[lanes_i])(context, builder, args[lanes_i])
    x = context.make_array(sig.args[rows_i])(context, builder, args[rows_i])
    order = context.make_array(sig.args[1])(context, builder, args[1])
    g = _tools(context, builder, sig.args[0].dtype)
    i, as_intp = g.const, g.as_intp

    c0, nc = as_intp(args[2]), as_intp(args[3])
    F = cgutils.unpack_tuple(builder, x.shape, 2)[1]
    width = cgutils.unpack_tuple(builder, xt.shape, 2)[1]
    n_tiles = builder.sdiv(F, i(W))
    n_groups = builder.sdiv(builder.add(nc, i(W - 1)), i(W)) if to_rows else i(ROWS)
    first = as_intp(builder.load(order.data))
    with cgutils.for_range(builder, n_groups) as gl:
        lane0 = builder.mul(gl.index, i(W))
        rows = []
        valid = []
        for r in range(W):
            k = builder.add(lane0, i(r))
            ok = builder.icmp_signed("<", k, nc)
            row = builder.add(c0, builder.select(
                ok, as_intp(builder.load(builder.gep(order.data, [k]))), first))
            valid.append(ok)
            rows.append(builder.mul(row, F))
        with cgutils.for_range(builder, n_tiles) as tl:
            f0 = builder.mul(tl.index, i(W))
            if to_rows:
                v = [g.load(xt, builder.add(builder.mul(builder.add(f0, i(r)), width), lane0))
                     for r in range(W)]
                v = _transpose(builder, v)
                for r in range(W):
                    with cgutils.if_likely(builder, valid[r]):
                        g.store(v[r], x, builder.add(rows[r], f0))
            else:
                zero = ir.Constant(g.vec, None)
                v = [builder.select(valid[r], g.load(x, builder.add(rows[r], f0)), zero)
                     for r in range(W)]
                v = _transpose(builder, v)
                for r in range(W):
                    off = builder.add(builder.mul(builder.add(f0, i(r)), width), lane0)
                    g.store(v[r], xt, off)
    return context.get_dummy_value()


def _tiles_check(lanes, order, rows):
    return (all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
                for a in (lanes, rows)) and lanes.dtype == rows.dtype
            and isinstance(lanes.dtype, types.Float) and isinstance(order, types.Array)
            and isinstance(order.dtype, types.Integer) and order.layout == "C")


@intrinsic
def lanes_to_rows(typingctx, Xt, order, c0, nc, X):
    """X[c0 + order[k], f] = Xt[f, k] for lanes k < nc and f < 16 (F // 16), the full tiles
    (the caller moves the last F % 16 features).  Xt (F', 64) with F' >= F; X (N, F)."""
    if not _tiles_check(Xt, order, X):
        return None
    return types.void(Xt, order, c0, nc, X), lambda c, b, s, a: _tiles_codegen(c, b, s, a, True)


@intrinsic
def rows_to_lanes(typingctx, X, order, c0, nc, Xt):
    """Xt[f, k] = X[c0 + order[k], f] for lanes k < nc, 0 for 64 > k >= nc, f < 16 (F // 16)
    (the full tiles, as lanes_to_rows).  X (N, F); Xt (F', 64)."""
    if not _tiles_check(Xt, order, X):
        return None
    return types.void(X, order, c0, nc, Xt), lambda c, b, s, a: _tiles_codegen(c, b, s, a, False)


@intrinsic
def clenshaw_rows(typingctx, x, cf, D, scale, out, c):
    """out[c, b] = scale[b] * sum_{k <= D} cf[k] T_k(x[b]) for the 64 slots b of a block
    (Clenshaw's recurrence, D >= 1 at run time).

    Each step of the recurrence waits for the previous one (one FMA latency), so the 64
    slots run as four independent 16-lane chains held in registers.  As a numba function
    the recurrence needed a literal D to be unrolled and vectorised, one compiled variant
    per degree; the calls to them, with every array passed member by member, cost about
    as much as the recurrence itself.  x, scale (64,); cf (>= D+1,); out (n, 64)."""
    arrays = (x, cf, scale, out)
    if not (all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == x.dtype
                for a in arrays) and isinstance(x.dtype, types.Float)
            and isinstance(D, types.Integer) and isinstance(c, types.Integer)):
        return None
    sig = types.void(x, cf, D, scale, out, c)

    def codegen(context, builder, signature, args):
        xa, cfa, sa, oa = (context.make_array(t)(context, builder, a) for t, a in
                           zip((signature.args[0], signature.args[1], signature.args[3],
                                signature.args[4]), (args[0], args[1], args[3], args[4])))
        g = _tools(context, builder, signature.args[0].dtype)
        i, as_intp, vload, vec, fma = g.const, g.as_intp, g.load, g.vec, g.fma

        def splat(v):
            e = builder.insert_element(ir.Constant(vec, None), v, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(e, ir.Constant(vec, None),
                                          ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))

        def coef(k):
            return splat(builder.load(builder.gep(cfa.data, [k])))

        D_ = as_intp(args[2])
        t = [vload(xa, i(r * W)) for r in range(ROWS)]
        u = [builder.fadd(v, v) for v in t]
        p_vars = [cgutils.alloca_once(builder, vec) for _ in range(ROWS)]
        q_vars = [cgutils.alloca_once(builder, vec) for _ in range(ROWS)]
        top = coef(D_)
        for r in range(ROWS):
            builder.store(top, p_vars[r])
            builder.store(ir.Constant(vec, None), q_vars[r])
        # k = D-1 .. 1
        with cgutils.for_range(builder, builder.sub(D_, i(1))) as loop:
            k = builder.sub(builder.sub(D_, i(1)), loop.index)
            ck = coef(k)
            for r in range(ROWS):
                p = builder.load(p_vars[r])
                q = builder.load(q_vars[r])
                # cf[k] - b2 is off the critical path: one FMA latency per step
                n = builder.call(fma, [u[r], p, builder.fsub(ck, q)])
                builder.store(p, q_vars[r])
                builder.store(n, p_vars[r])
        c0 = coef(i(0))
        row = builder.mul(as_intp(args[5]), cgutils.unpack_tuple(builder, oa.shape, 2)[1])
        for r in range(ROWS):
            p = builder.load(p_vars[r])
            q = builder.load(q_vars[r])
            v = builder.fadd(builder.call(fma, [t[r], p, builder.fneg(q)]), c0)
            v = builder.fmul(v, vload(sa, i(r * W)))
            g.store(v, oa, builder.add(row, i(r * W)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_power_spectrum(typingctx, Xt, arrays, pair_index, start, length, S):
    """Xt[pair_index[a, b] n_nl + c, k] = sum over the m run q of column c of
    A^a_q A^b_q (arrays = (At,)) or of Adot^a_q A^b_q + A^a_q Adot^b_q (arrays = (At, Adt)),
    for the species pairs a <= b, the n_nl columns c and the lanes k.

    Per column and 16 lanes, the S species' rows of each q are loaded once and the
    S (S + 1) / 2 sums stay in registers over the m run (as numba loops, each pair's Xt row
    was read and written back once per q: ~4x the FMA time).  At, Adt (S, n_nlm, width);
    Xt (F, width), width a multiple of 16; pair_index (S, S); start, length (n_nl,)."""
    if not (isinstance(arrays, types.UniTuple) and arrays.count in (1, 2)
            and _check((Xt, arrays.dtype), S) and isinstance(pair_index, types.Array)
            and all(isinstance(a, types.Array) and isinstance(a.dtype, types.Integer)
                    and a.layout == "C" for a in (pair_index, start, length))):
        return None
    dot = arrays.count == 2
    sig = types.void(Xt, arrays, pair_index, start, length, S)

    def emit(context, builder, signature, args, n_s):
        g = _tools(context, builder, signature.args[0].dtype)
        i = g.const
        xt = context.make_array(signature.args[0])(context, builder, args[0])
        arys = [context.make_array(arrays.dtype)(context, builder, v)
                for v in cgutils.unpack_tuple(builder, args[1], arrays.count)]
        pidx, st, ln = (context.make_array(signature.args[k])(context, builder, args[k])
                        for k in (2, 3, 4))
        _, n_nlm, width = cgutils.unpack_tuple(builder, arys[0].shape, 3)
        plane = builder.mul(n_nlm, width)
        n_nl = cgutils.unpack_tuple(builder, st.shape, 1)[0]
        pairs = [(a, b) for a in range(n_s) for b in range(a, n_s)]
        pair_rows = [_index(builder, g, pidx, i(a * n_s + b)) for a, b in pairs]
        accs = [cgutils.alloca_once(builder, g.vec) for _ in pairs]
        zero = ir.Constant(g.vec, None)
        with cgutils.for_range(builder, n_nl) as cl:
            c = cl.index
            q0 = _index(builder, g, st, c)
            n_m = _index(builder, g, ln, c)
            with cgutils.for_range(builder, builder.sdiv(width, i(W))) as hl:
                lane = builder.mul(hl.index, i(W))
                for acc in accs:
                    builder.store(zero, acc)
                with cgutils.for_range(builder, n_m) as ml:
                    row = builder.add(builder.mul(builder.add(q0, ml.index), width), lane)
                    offs = [builder.add(builder.mul(i(s), plane), row) for s in range(n_s)]
                    v = [g.load(arys[0], o) for o in offs]
                    w = [g.load(arys[1], o) for o in offs] if dot else None
                    for (a, b), acc in zip(pairs, accs):
                        x = builder.load(acc)
                        if dot:
                            x = builder.call(g.fma, [v[a], w[b], x])
                            x = builder.call(g.fma, [w[a], v[b], x])
                        else:
                            x = builder.call(g.fma, [v[a], v[b], x])
                        builder.store(x, acc)
                for pr, acc in zip(pair_rows, accs):
                    f = builder.add(builder.mul(pr, n_nl), c)
                    g.store(builder.load(acc), xt, builder.add(builder.mul(f, width), lane))

    def codegen(context, builder, signature, args):
        _species_cases(builder, args[5],
                       lambda n_s: emit(context, builder, signature, args, n_s))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_abar(typingctx, AbT, At, Xbt, pair_index, col, S):
    """AbT[a, q, k] = sum_b w_ab Xbt[pair_index[min(a, b), max(a, b)] n_nl + col[q], k]
    At[b, q, k], w = 2 for a = b (X^{aa} = sum A^a A^a) and 1 otherwise, for every q and
    lane k (n_nl = Xbt's rows / the number of pairs).

    Per q and 16 lanes the S rows of At and the S (S + 1) / 2 rows of Xbt are loaded once
    and the S sums kept in registers (as numba loops, AbT was read and written back once
    per pair).  AbT, At (S, n_nlm, width); Xbt (F, width); pair_index (S, S); col (n_nlm,)."""
    if not (_check((AbT, At, Xbt), S) and all(
            isinstance(a, types.Array) and isinstance(a.dtype, types.Integer)
            and a.layout == "C" for a in (pair_index, col))):
        return None
    sig = types.void(AbT, At, Xbt, pair_index, col, S)

    def emit(context, builder, signature, args, n_s):
        g = _tools(context, builder, signature.args[0].dtype)
        i = g.const
        abt, at, xbt, pidx, cl = (context.make_array(t)(context, builder, a)
                                  for t, a in zip(signature.args[:5], args[:5]))
        _, n_nlm, width = cgutils.unpack_tuple(builder, at.shape, 3)
        plane = builder.mul(n_nlm, width)
        n_pairs = n_s * (n_s + 1) // 2
        n_nl = builder.sdiv(cgutils.unpack_tuple(builder, xbt.shape, 2)[0], i(n_pairs))
        pairs = [(a, b) for a in range(n_s) for b in range(a, n_s)]
        pair_rows = [builder.mul(_index(builder, g, pidx, i(a * n_s + b)), n_nl)
                     for a, b in pairs]
        with cgutils.for_range(builder, n_nlm) as ql:
            q = ql.index
            c = _index(builder, g, cl, q)
            with cgutils.for_range(builder, builder.sdiv(width, i(W))) as hl:
                lane = builder.mul(hl.index, i(W))
                row = builder.add(builder.mul(q, width), lane)
                offs = [builder.add(builder.mul(i(s), plane), row) for s in range(n_s)]
                v = [g.load(at, o) for o in offs]
                acc = [None] * n_s
                for (a, b), pr in zip(pairs, pair_rows):
                    x = g.load(xbt, builder.add(builder.mul(builder.add(pr, c), width), lane))
                    if a == b:
                        x = builder.fadd(x, x)
                        terms = ((a, v[a]),)
                    else:
                        terms = ((a, v[b]), (b, v[a]))
                    for t, y in terms:
                        acc[t] = (builder.fmul(x, y) if acc[t] is None else
                                  builder.call(g.fma, [x, y, acc[t]]))
                for s in range(n_s):
                    g.store(acc[s], abt, offs[s])

    def codegen(context, builder, signature, args):
        _species_cases(builder, args[5],
                       lambda n_s: emit(context, builder, signature, args, n_s))
        return context.get_dummy_value()

    return sig, codegen
