"""O(N) cell-list neighbour search in pure numba.

Convention
----------
Exactly ``ase.neighborlist.neighbor_list("ijS", atoms, r_cut)`` with
``self_interaction=False``: every ordered pair ``(i, j, S)`` (``S`` an integer
image shift, shape (3,)) such that ``|x_j + S @ cell - x_i| < r_cut`` over ALL
periodic images, except the trivial self pair ``i == j, S == 0``.

* ``cell`` holds the lattice vectors as rows (ASE convention).
* ``pbc`` is per direction; ``S`` is zero along open directions.  Along open
  directions the given cell row is ignored (it may be zero / degenerate): the
  bins there span the bounding box of the positions.
* Positions are NOT wrapped: ``S`` refers to the positions as given.
* Cells thinner than ``r_cut`` (or ``2 r_cut``) produce several images of one
  atom; an atom can neighbour its own image (``i == j`` with ``S != 0``).
* Distance 0: ASE only removes ``i == j, S == 0``; two *different* atoms at the
  same position (distance exactly 0) ARE listed by ASE (``0 < r_cut``).  This
  module matches ASE exactly, i.e. such duplicate pairs are kept.
* The in/out decision reproduces ASE's arithmetic
  (``d = sqrt(sum((x_j - x_i + S @ cell)**2)) < r_cut``): a fast test on
  wrapped coordinates decides all pairs that are clearly inside/outside and
  pairs within a few ulps of ``r_cut`` are re-evaluated with ASE's formula on
  the original positions.  Positions in float32 are converted to float64 first
  (so the result equals ASE run on the float32 values cast to float64).

Output layout (why centre-sorted CSR)
-------------------------------------
Pairs are written sorted by centre: all pairs of centre 0, then centre 1, ...
(CSR order; ``offsets = searchsorted(centers, arange(N + 1))``).  The
descriptor kernels loop over centres in parallel and read each centre's
contiguous neighbour run, so this layout gives them contiguous, lock-free
reads and writes with no extra sort.  It also falls out for free from the
two-pass build used here: pass 1 counts the neighbours of each centre, a
prefix sum gives each centre its output slot, pass 2 fills every centre's run
independently (no locks, no atomics, deterministic order).

Algorithm
---------
Atoms are binned in fractional coordinates of a basis whose periodic rows are
the lattice vectors and whose open rows are orthonormal vectors perpendicular
to the periodic ones.  The number of bins along each direction is chosen so
that the *perpendicular* bin width is >= r_cut (triclinic-safe); the search
then loops over ``2*m+1`` neighbouring bins per direction (``m = 1`` unless
the cell is thinner than r_cut, in which case ``m = ceil(r_cut / width)``
images are visited).  Atoms are counting-sorted by bin (stable), so the
neighbouring bins along x of one bin row are one contiguous run of atoms
("segment"); all centres of a bin share the same segment list.  In dense
systems (>= 8 atoms per r_cut-wide bin) the bins along direction 0 are halved
(search +-2 there), which shortens each segment from 3 to 2.5 r_cut without
adding segments.  Count pass: a vectorised compare-and-count per segment.
Fill pass: branch-free compaction per segment, then the writes; pairs within
a few ulps of r_cut are re-decided with ASE's formula in both passes.  Work
is split over chunks of bins, claimed by one worker per thread (N >= 4096;
smaller systems run serially because a parallel region costs more than the
whole search).
Memory: O(N) for bins and sorted copies (~70 bytes/atom, ~110 at the peak of
the binning step) plus 20 bytes per pair for the output.

Return codes of the njit entry points: n_pairs >= 0, or ERR_NONFINITE (-1),
ERR_CELL (-2, degenerate cell along a periodic direction), ERR_RCUT (-3),
ERR_TOO_MANY_IMAGES (-4, > 100000 images along one direction).  The host
function turns them into ValueError.

Public functions
----------------
``count_and_fill(positions, cell, pbc, r_cut, capacity, centers_out,
neighbors_out, shifts_out) -> n_pairs``  (numba njit, callable from other
numba code / an XLA FFI wrapper).

``neighbor_pairs_numba(positions, cell, pbc, r_cut) -> (i, j, S)``  host
convenience that validates, sizes the output exactly and returns int32 numpy
arrays ``i (P,)``, ``j (P,)``, ``S (P, 3)`` in CSR (centre) order.

Lower level (used by the host function, also njit):
``search_count(positions, cell, pbc, r_cut) -> (status, state, offsets)`` and
``search_fill(positions, state, offsets, capacity, centers_out,
neighbors_out, shifts_out)``.
"""

import math
import mmap
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .parallel import claim, num_threads

__all__ = [
    "count_and_fill",
    "neighbor_pairs_numba",
    "release_output_buffers",
    "search_count",
    "search_fill",
    "ERR_NONFINITE",
    "ERR_CELL",
    "ERR_RCUT",
    "ERR_TOO_MANY_IMAGES",
]

# Negative return codes of the njit entry points (no exceptions can cross an
# FFI boundary, so the core reports problems by value).
ERR_NONFINITE = -1  # NaN / inf in positions (or in a periodic cell row)
ERR_CELL = -2  # singular / degenerate cell along the periodic directions
ERR_RCUT = -3  # r_cut <= 0 or not finite
ERR_TOO_MANY_IMAGES = -4  # cell absurdly thin w.r.t. r_cut (> _MAX_IMAGES)

_MAX_IMAGES = 100_000  # per direction; beyond this the cell is treated as bad
_DEGENERATE_TOL = 1e-12  # relative volume / area below which a cell is singular
_BIN_SAFETY = 1.0 + 1e-8  # bins are made this much wider than r_cut
_EPS = 2.220446049250313e-16
_PREFETCH_AHEAD = 6  # centres (in bin order) between a run's prefetch and its writes


def _prefetch_intrinsic(write):
    @intrinsic
    def prefetch(typingctx, arr, idx):
        """Hint the cache line holding ``arr[idx]`` (first axis; no bounds check)."""
        sig = types.void(arr, idx)

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            zero = context.get_constant(types.intp, 0)
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary,
                                           [args[1]] + [zero] * (aryty.ndim - 1),
                                           wraparound=False)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0i8")  # the typed-pointer name; LLVM >= 15 auto-upgrades it
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, int(write)),
                              ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    return prefetch


# The fill pass visits centres in bin order but writes each centre's run at its
# CSR slot (original order): at 10^5-10^6 atoms those writes land on random
# lines far out of cache.  Prefetching the lines of the run a few centres ahead
# overlaps their misses with the distance tests.
_prefetch_w = _prefetch_intrinsic(True)
_prefetch_r = _prefetch_intrinsic(False)


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------
@njit(cache=True)
def _cross(a0, a1, a2, b0, b1, b2):
    return a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0


@njit(cache=True)
def _basis(cell, pbc):
    """Binning basis.

    Returns ``(code, M, B, cell_eff)``: ``M`` (3,3) rows = periodic lattice
    vectors, open rows replaced by unit vectors orthogonal to the periodic
    ones; ``B`` (3,3) rows = reciprocal vectors (``frac_c = x . B[c]``);
    ``cell_eff`` = cell with open rows zeroed (used for the exact distance).
    """
    M = np.zeros((3, 3))
    B = np.zeros((3, 3))
    cell_eff = np.zeros((3, 3))
    per = np.zeros(3, np.int64)
    nper = 0
    for c in range(3):
        if pbc[c]:
            per[nper] = c
            nper += 1
            for d in range(3):
                v = np.float64(cell[c, d])
                if not math.isfinite(v):
                    return ERR_NONFINITE, M, B, cell_eff
                M[c, d] = v
                cell_eff[c, d] = v
    opn = np.zeros(3, np.int64)
    nopn = 0
    for c in range(3):
        if not pbc[c]:
            opn[nopn] = c
            nopn += 1
    if nper == 3:
        pass
    elif nper == 2:
        p, q, o = per[0], per[1], opn[0]
        na = math.sqrt(M[p, 0] ** 2 + M[p, 1] ** 2 + M[p, 2] ** 2)
        nb = math.sqrt(M[q, 0] ** 2 + M[q, 1] ** 2 + M[q, 2] ** 2)
        n0, n1, n2 = _cross(M[p, 0], M[p, 1], M[p, 2], M[q, 0], M[q, 1], M[q, 2])
        nn = math.sqrt(n0 * n0 + n1 * n1 + n2 * n2)
        if na == 0.0 or nb == 0.0 or not (nn > _DEGENERATE_TOL * na * nb):
            return ERR_CELL, M, B, cell_eff
        M[o, 0] = n0 / nn
        M[o, 1] = n1 / nn
        M[o, 2] = n2 / nn
    elif nper == 1:
        p = per[0]
        na = math.sqrt(M[p, 0] ** 2 + M[p, 1] ** 2 + M[p, 2] ** 2)
        if not (na > 0.0):
            return ERR_CELL, M, B, cell_eff
        a0, a1, a2 = M[p, 0] / na, M[p, 1] / na, M[p, 2] / na
        # helper axis: the Cartesian axis least aligned with a
        e0, e1, e2 = 0.0, 0.0, 0.0
        if abs(a0) <= abs(a1) and abs(a0) <= abs(a2):
            e0 = 1.0
        elif abs(a1) <= abs(a2):
            e1 = 1.0
        else:
            e2 = 1.0
        u0, u1, u2 = _cross(a0, a1, a2, e0, e1, e2)
        nu = math.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
        u0, u1, u2 = u0 / nu, u1 / nu, u2 / nu
        v0, v1, v2 = _cross(a0, a1, a2, u0, u1, u2)
        M[opn[0], 0], M[opn[0], 1], M[opn[0], 2] = u0, u1, u2
        M[opn[1], 0], M[opn[1], 1], M[opn[1], 2] = v0, v1, v2
    else:
        for c in range(3):
            M[c, c] = 1.0
    # reciprocal vectors: B[c] = (M[c+1] x M[c+2]) / det
    c0 = _cross(M[1, 0], M[1, 1], M[1, 2], M[2, 0], M[2, 1], M[2, 2])
    c1 = _cross(M[2, 0], M[2, 1], M[2, 2], M[0, 0], M[0, 1], M[0, 2])
    c2 = _cross(M[0, 0], M[0, 1], M[0, 2], M[1, 0], M[1, 1], M[1, 2])
    det = M[0, 0] * c0[0] + M[0, 1] * c0[1] + M[0, 2] * c0[2]
    if nper == 3:
        n0 = math.sqrt(M[0, 0] ** 2 + M[0, 1] ** 2 + M[0, 2] ** 2)
        n1 = math.sqrt(M[1, 0] ** 2 + M[1, 1] ** 2 + M[1, 2] ** 2)
        n2 = math.sqrt(M[2, 0] ** 2 + M[2, 1] ** 2 + M[2, 2] ** 2)
        if (
            n0 == 0.0
            or n1 == 0.0
            or n2 == 0.0
            or not (abs(det) > _DEGENERATE_TOL * n0 * n1 * n2)
        ):
            return ERR_CELL, M, B, cell_eff
    for d in range(3):
        B[0, d] = c0[d] / det
        B[1, d] = c1[d] / det
        B[2, d] = c2[d] / det
    return 0, M, B, cell_eff


@njit(cache=True)
def _validate(positions, cell, pbc, r_cut):
    """0 if the input is usable, else one of the negative ERR_* codes."""
    rc = np.float64(r_cut)
    if not (math.isfinite(rc) and rc > 0.0):
        return ERR_RCUT
    n = positions.shape[0]
    for i in range(n):
        for d in range(3):
            if not math.isfinite(np.float64(positions[i, d])):
                return ERR_NONFINITE
    code, M, B, cell_eff = _basis(cell, pbc)
    if code != 0:
        return code
    rr = rc * _BIN_SAFETY
    for c in range(3):
        if pbc[c]:
            h = 1.0 / math.sqrt(B[c, 0] ** 2 + B[c, 1] ** 2 + B[c, 2] ** 2)
            if rr / h > _MAX_IMAGES:
                return ERR_TOO_MANY_IMAGES
    return 0


# --------------------------------------------------------------------------
# binning
# --------------------------------------------------------------------------
@njit(cache=True)
def _n_search(c, nb, h, per, rr):
    if nb == 1 and not per[c]:
        return 0
    m = int(math.ceil(rr * nb / h))
    if not per[c] and m > nb - 1:
        m = nb - 1
    return m


# Small systems run serially: a parallel region costs tens of microseconds
# (and far more with the OpenMP layer on an oversubscribed machine).
_PARALLEL_MIN_ATOMS = 4096


@njit(cache=True)
def _n_atom_chunks(n):
    return max(1, min(n // 1024, 64))


@njit(cache=True)
def _frac_range(a, b, positions, B, per, frac, kq):
    for i in range(a, b):
        x0 = np.float64(positions[i, 0])
        x1 = np.float64(positions[i, 1])
        x2 = np.float64(positions[i, 2])
        for c in range(3):
            f = x0 * B[c, 0] + x1 * B[c, 1] + x2 * B[c, 2]
            if per[c]:
                k = math.floor(f)
                f = f - k
                kq[i, c] = np.int32(k)
            frac[i, c] = f


@njit(cache=True, parallel=True)
def _frac_par(positions, B, per, frac, kq, nchunks):
    n = positions.shape[0]
    for ch in prange(nchunks):
        _frac_range(ch * n // nchunks, (ch + 1) * n // nchunks, positions, B,
                    per, frac, kq)


@njit(cache=True)
def _bin_range(a, b, frac, fmin, scale, nb, binof):
    for i in range(a, b):
        lin = 0
        for cc in range(3):
            c = 2 - cc
            v = int(math.floor((frac[i, c] - fmin[c]) * scale[c]))
            if v < 0:
                v = 0
            if v >= nb[c]:
                v = nb[c] - 1
            lin = lin * nb[c] + v
        binof[i] = lin


@njit(cache=True, parallel=True)
def _bin_par(frac, fmin, scale, nb, binof, nchunks):
    n = frac.shape[0]
    for ch in prange(nchunks):
        _bin_range(ch * n // nchunks, (ch + 1) * n // nchunks, frac, fmin,
                   scale, nb, binof)


@njit(cache=True)
def _gather_range(a, b, positions, kq, perm, M, xs, ys, zs, ks):
    for t in range(a, b):
        i = perm[t]
        k0, k1, k2 = kq[i, 0], kq[i, 1], kq[i, 2]
        ks[t, 0] = k0
        ks[t, 1] = k1
        ks[t, 2] = k2
        xs[t] = np.float64(positions[i, 0]) - (
            k0 * M[0, 0] + k1 * M[1, 0] + k2 * M[2, 0]
        )
        ys[t] = np.float64(positions[i, 1]) - (
            k0 * M[0, 1] + k1 * M[1, 1] + k2 * M[2, 1]
        )
        zs[t] = np.float64(positions[i, 2]) - (
            k0 * M[0, 2] + k1 * M[1, 2] + k2 * M[2, 2]
        )


@njit(cache=True, parallel=True)
def _gather_par(positions, kq, perm, M, xs, ys, zs, ks, nchunks):
    n = positions.shape[0]
    for ch in prange(nchunks):
        _gather_range(ch * n // nchunks, (ch + 1) * n // nchunks, positions,
                      kq, perm, M, xs, ys, zs, ks)


@njit(cache=True)
def _plan(positions, cell, pbc, r_cut):
    """Bin the atoms.  Assumes ``_validate`` returned 0 and N > 0."""
    n = positions.shape[0]
    rc = np.float64(r_cut)
    rr = rc * _BIN_SAFETY
    code, M, B, cell_eff = _basis(cell, pbc)
    per = np.zeros(3, np.bool_)
    for c in range(3):
        per[c] = bool(pbc[c])

    # fractional coordinates and integer wrap shifts k (periodic dirs only)
    frac = np.empty((n, 3))
    kq = np.zeros((n, 3), np.int32)
    nchunks = _n_atom_chunks(n)
    if n >= _PARALLEL_MIN_ATOMS:
        _frac_par(positions, B, per, frac, kq, nchunks)
    else:
        _frac_range(0, n, positions, B, per, frac, kq)

    nb = np.ones(3, np.int64)
    ms = np.zeros(3, np.int64)
    h = np.ones(3)
    fmin = np.zeros(3)
    scale = np.zeros(3)
    for c in range(3):
        if per[c]:
            h[c] = 1.0 / math.sqrt(B[c, 0] ** 2 + B[c, 1] ** 2 + B[c, 2] ** 2)
            fmin[c] = 0.0
        else:
            lo_c = frac[0, c]
            hi_c = frac[0, c]
            for i in range(1, n):
                v = frac[i, c]
                if v < lo_c:
                    lo_c = v
                if v > hi_c:
                    hi_c = v
            fmin[c] = lo_c
            h[c] = hi_c - lo_c  # open rows of M are orthonormal
        nbf = math.floor(h[c] / rr)
        if nbf < 1.0:
            nbf = 1.0
        if nbf > 1048576.0:
            nbf = 1048576.0
        nb[c] = int(nbf)
    # dense bins (>= 8 atoms per r_cut-wide bin, e.g. r_cut = 5 A at 0.1
    # atoms/A^3): halve the bins along direction 0 (search +-2 there).  The
    # x-run of neighbouring bins stays one contiguous segment but covers
    # 2.5 instead of 3 r_cut: ~15% fewer candidates, no extra segments.
    if n > 8 * nb[0] * nb[1] * nb[2] and nb[0] > 1:
        nb[0] *= 2
    # keep the number of bins O(N)
    limit = 4 * n + 64
    while nb[0] * nb[1] * nb[2] > limit:
        c = 0
        if nb[1] > nb[c]:
            c = 1
        if nb[2] > nb[c]:
            c = 2
        nb[c] = max(1, nb[c] // 2)
    for c in range(3):
        ms[c] = _n_search(c, nb[c], h[c], per, rr)
        if per[c]:
            scale[c] = nb[c]
        else:
            scale[c] = nb[c] / h[c] if h[c] > 0.0 else 0.0

    nbins = nb[0] * nb[1] * nb[2]
    binof = np.empty(n, np.int64)
    if n >= _PARALLEL_MIN_ATOMS:
        _bin_par(frac, fmin, scale, nb, binof, nchunks)
    else:
        _bin_range(0, n, frac, fmin, scale, nb, binof)

    # stable counting sort by bin
    cell_start = np.zeros(nbins + 1, np.int64)
    for i in range(n):
        cell_start[binof[i] + 1] += 1
    maxbin = 0
    for b in range(nbins):
        if cell_start[b + 1] > maxbin:
            maxbin = cell_start[b + 1]
        cell_start[b + 1] += cell_start[b]
    fill = cell_start[:-1].copy()
    perm = np.empty(n, np.int64)
    for i in range(n):
        b = binof[i]
        perm[fill[b]] = i
        fill[b] += 1

    xs = np.empty(n)
    ys = np.empty(n)
    zs = np.empty(n)
    ks = np.empty((n, 3), np.int32)
    xmax = 0.0
    kmax = np.zeros(3, np.int64)
    if n >= _PARALLEL_MIN_ATOMS:
        _gather_par(positions, kq, perm, M, xs, ys, zs, ks, nchunks)
    else:
        _gather_range(0, n, positions, kq, perm, M, xs, ys, zs, ks)
    for i in range(n):
        for c in range(3):
            a = abs(np.float64(positions[i, c]))
            if a > xmax:
                xmax = a
            kk = abs(kq[i, c])
            if kk > kmax[c]:
                kmax[c] = kk
    # magnitude scale of every coordinate that enters a distance: sets the
    # width of the band in which the fast test defers to ASE's formula
    X = xmax + rc
    for c in range(3):
        if per[c]:
            X += (kmax[c] + ms[c] + 1) * math.sqrt(
                M[c, 0] ** 2 + M[c, 1] ** 2 + M[c, 2] ** 2
            )
    tol = 256.0 * _EPS * X * X
    lo = rc * rc - tol
    hi = rc * rc + tol
    return (nb, ms, per, M, cell_eff, xs, ys, zs, ks, perm, cell_start,
            maxbin, rc, lo, hi)


# --------------------------------------------------------------------------
# search kernels
# --------------------------------------------------------------------------
@njit(cache=True)
def _bin_segments(b, nb, ms, per, M, cell_start, seg_a, seg_q, seg_o):
    """Contiguous atom runs ("segments") neighbouring bin ``b``.

    ``seg_a[s] = (start, stop)`` in the sorted order, ``seg_q[s]`` the image
    shift of the segment, ``seg_o[s] = seg_q[s] @ M`` its Cartesian offset.
    """
    nx, ny, nz = nb[0], nb[1], nb[2]
    bx = b % nx
    r = b // nx
    by = r % ny
    bz = r // ny
    nseg = 0
    for dz in range(-ms[2], ms[2] + 1):
        z = bz + dz
        if per[2]:
            qz = z // nz
            rz = z - qz * nz
        else:
            if z < 0 or z >= nz:
                continue
            qz = 0
            rz = z
        for dy in range(-ms[1], ms[1] + 1):
            y = by + dy
            if per[1]:
                qy = y // ny
                ry = y - qy * ny
            else:
                if y < 0 or y >= ny:
                    continue
                qy = 0
                ry = y
            base = nx * (ry + ny * rz)
            x0 = bx - ms[0]
            x1 = bx + ms[0]
            if not per[0]:
                x0 = max(x0, 0)
                x1 = min(x1, nx - 1)
            s = x0
            while s <= x1:
                if per[0]:
                    qx = s // nx
                    rx = s - qx * nx
                    e = min(x1, (qx + 1) * nx - 1)
                else:
                    qx = 0
                    rx = s
                    e = x1
                a0 = cell_start[base + rx]
                a1 = cell_start[base + rx + (e - s) + 1]
                if a1 > a0:
                    seg_a[nseg, 0] = a0
                    seg_a[nseg, 1] = a1
                    seg_q[nseg, 0] = qx
                    seg_q[nseg, 1] = qy
                    seg_q[nseg, 2] = qz
                    for d in range(3):
                        seg_o[nseg, d] = qx * M[0, d] + qy * M[1, d] + qz * M[2, d]
                    nseg += 1
                s = e + 1
    return nseg


@njit(cache=True)
def _exact_ok(i, j, s0, s1, s2, positions, cell_eff, rc):
    """ASE's own test: d = |x_j - x_i + S @ cell| < r_cut, minus the self pair."""
    if i == j and s0 == 0 and s1 == 0 and s2 == 0:
        return False
    d0 = (np.float64(positions[j, 0]) - np.float64(positions[i, 0])) + (
        (s0 * cell_eff[0, 0] + s1 * cell_eff[1, 0]) + s2 * cell_eff[2, 0]
    )
    d1 = (np.float64(positions[j, 1]) - np.float64(positions[i, 1])) + (
        (s0 * cell_eff[0, 1] + s1 * cell_eff[1, 1]) + s2 * cell_eff[2, 1]
    )
    d2 = (np.float64(positions[j, 2]) - np.float64(positions[i, 2])) + (
        (s0 * cell_eff[0, 2] + s1 * cell_eff[1, 2]) + s2 * cell_eff[2, 2]
    )
    return math.sqrt((d0 * d0 + d1 * d1) + d2 * d2) < rc


@njit(cache=True)
def _n_chunks(nbins):
    return min(nbins, 256)


@njit(cache=True)
def _count_chunk(ch, nchunks, positions, state, counts_sorted):
    (nb, ms, per, M, cell_eff, xs, ys, zs, ks, perm, cell_start,
     maxbin, rc, lo, hi) = state
    nbins = nb[0] * nb[1] * nb[2]
    maxseg = (2 * ms[0] + 1) * (2 * ms[1] + 1) * (2 * ms[2] + 1)
    self_counted = 1 if lo > 0.0 else 0
    b0 = ch * nbins // nchunks
    b1 = (ch + 1) * nbins // nchunks
    seg_a = np.empty((maxseg, 2), np.int64)
    seg_q = np.empty((maxseg, 3), np.int64)
    seg_o = np.empty((maxseg, 3))
    for b in range(b0, b1):
        t0 = cell_start[b]
        t1 = cell_start[b + 1]
        if t1 == t0:
            continue
        nseg = _bin_segments(b, nb, ms, per, M, cell_start, seg_a, seg_q, seg_o)
        for t in range(t0, t1):
            cx = xs[t]
            cy = ys[t]
            cz = zs[t]
            total = 0
            for s in range(nseg):
                px = cx - seg_o[s, 0]
                py = cy - seg_o[s, 1]
                pz = cz - seg_o[s, 2]
                a0 = seg_a[s, 0]
                a1 = seg_a[s, 1]
                c_lo = 0
                c_hi = 0
                for u in range(a0, a1):
                    dx = xs[u] - px
                    dy = ys[u] - py
                    dz = zs[u] - pz
                    d2 = dx * dx + dy * dy + dz * dz
                    c_lo += d2 < lo
                    c_hi += d2 < hi
                if c_hi != c_lo:
                    # pairs within rounding of r_cut: decide as ASE does
                    i = perm[t]
                    for u in range(a0, a1):
                        dx = xs[u] - px
                        dy = ys[u] - py
                        dz = zs[u] - pz
                        d2 = dx * dx + dy * dy + dz * dz
                        if d2 >= lo and d2 < hi:
                            if _exact_ok(
                                i, perm[u],
                                seg_q[s, 0] + ks[t, 0] - ks[u, 0],
                                seg_q[s, 1] + ks[t, 1] - ks[u, 1],
                                seg_q[s, 2] + ks[t, 2] - ks[u, 2],
                                positions, cell_eff, rc,
                            ):
                                c_lo += 1
                total += c_lo
            counts_sorted[t] = total - self_counted


@njit(cache=True)
def _centre_pairs(t, i, p0, expected, nseg, seg_a, seg_q, seg_o, xs, ys, zs,
                  ks, perm, lo, hi, positions, cell_eff, rc, idx,
                  centers_out, neighbors_out, shifts_out):
    """Write the ``expected`` pairs of centre ``i`` (sorted index ``t``) at
    ``p0``.  Pairs clearly inside r_cut come first; if fewer than ``expected``
    were found, the rest are within rounding of r_cut and are decided with
    ASE's formula (the count pass used the same rule, so the total matches).
    """
    cx = xs[t]
    cy = ys[t]
    cz = zs[t]
    kt0 = ks[t, 0]
    kt1 = ks[t, 1]
    kt2 = ks[t, 2]
    p = p0
    for s in range(nseg):
        px = cx - seg_o[s, 0]
        py = cy - seg_o[s, 1]
        pz = cz - seg_o[s, 2]
        a0 = seg_a[s, 0]
        a1 = seg_a[s, 1]
        q0 = seg_q[s, 0]
        q1 = seg_q[s, 1]
        q2 = seg_q[s, 2]
        tself = t if (q0 == 0 and q1 == 0 and q2 == 0) else -1
        nacc = 0
        for u in range(a0, a1):  # branch-free compaction
            dx = xs[u] - px
            dy = ys[u] - py
            dz = zs[u] - pz
            d2 = dx * dx + dy * dy + dz * dz
            idx[nacc] = u
            nacc += (d2 < lo) & (u != tself)
        for w in range(nacc):
            u = idx[w]
            centers_out[p] = i
            neighbors_out[p] = perm[u]
            shifts_out[p, 0] = q0 + kt0 - ks[u, 0]
            shifts_out[p, 1] = q1 + kt1 - ks[u, 1]
            shifts_out[p, 2] = q2 + kt2 - ks[u, 2]
            p += 1
    if p - p0 < expected:
        for s in range(nseg):
            px = cx - seg_o[s, 0]
            py = cy - seg_o[s, 1]
            pz = cz - seg_o[s, 2]
            q0 = seg_q[s, 0]
            q1 = seg_q[s, 1]
            q2 = seg_q[s, 2]
            for u in range(seg_a[s, 0], seg_a[s, 1]):
                dx = xs[u] - px
                dy = ys[u] - py
                dz = zs[u] - pz
                d2 = dx * dx + dy * dy + dz * dz
                if d2 >= lo and d2 < hi:
                    s0 = q0 + kt0 - ks[u, 0]
                    s1 = q1 + kt1 - ks[u, 1]
                    s2 = q2 + kt2 - ks[u, 2]
                    if _exact_ok(i, perm[u], s0, s1, s2, positions, cell_eff,
                                 rc):
                        centers_out[p] = i
                        neighbors_out[p] = perm[u]
                        shifts_out[p, 0] = s0
                        shifts_out[p, 1] = s1
                        shifts_out[p, 2] = s2
                        p += 1
    return p - p0


@njit(cache=True)
def _fill_chunk(ch, nchunks, positions, state, offsets, capacity,
                centers_out, neighbors_out, shifts_out):
    (nb, ms, per, M, cell_eff, xs, ys, zs, ks, perm, cell_start,
     maxbin, rc, lo, hi) = state
    nbins = nb[0] * nb[1] * nb[2]
    maxseg = (2 * ms[0] + 1) * (2 * ms[1] + 1) * (2 * ms[2] + 1)
    maxlen = (2 * ms[0] + 1) * maxbin + 1
    b0 = ch * nbins // nchunks
    b1 = (ch + 1) * nbins // nchunks
    seg_a = np.empty((maxseg, 2), np.int64)
    seg_q = np.empty((maxseg, 3), np.int64)
    seg_o = np.empty((maxseg, 3))
    idx = np.empty(maxlen, np.int64)
    t_end = cell_start[b1]
    for b in range(b0, b1):
        t0 = cell_start[b]
        t1 = cell_start[b + 1]
        if t1 == t0:
            continue
        nseg = _bin_segments(b, nb, ms, per, M, cell_start, seg_a, seg_q, seg_o)
        for t in range(t0, t1):
            if t + 2 * _PREFETCH_AHEAD < t_end:
                _prefetch_r(offsets, perm[t + 2 * _PREFETCH_AHEAD])
            if t + _PREFETCH_AHEAD < t_end:
                ia = perm[t + _PREFETCH_AHEAD]
                q0 = offsets[ia]
                q1 = min(offsets[ia + 1], capacity)
                if q1 > q0:
                    # int32 runs: 16 per line; shifts rows of 12 bytes: 5 per line
                    for q in range(q0, q1, 16):
                        _prefetch_w(centers_out, q)
                        _prefetch_w(neighbors_out, q)
                    _prefetch_w(centers_out, q1 - 1)
                    _prefetch_w(neighbors_out, q1 - 1)
                    for q in range(q0, q1, 5):
                        _prefetch_w(shifts_out, q)
                    _prefetch_w(shifts_out, q1 - 1)
            i = perm[t]
            p0 = offsets[i]
            expected = offsets[i + 1] - p0
            if expected == 0 or p0 >= capacity:
                continue
            if p0 + expected <= capacity:
                _centre_pairs(t, i, p0, expected, nseg, seg_a, seg_q, seg_o,
                              xs, ys, zs, ks, perm, lo, hi, positions,
                              cell_eff, rc, idx,
                              centers_out, neighbors_out, shifts_out)
            else:
                # the one centre straddling the capacity: build its run in
                # scratch and copy the part that fits
                tc = np.empty(expected, centers_out.dtype)
                tj = np.empty(expected, neighbors_out.dtype)
                tsh = np.empty((expected, 3), shifts_out.dtype)
                _centre_pairs(t, i, 0, expected, nseg, seg_a, seg_q, seg_o,
                              xs, ys, zs, ks, perm, lo, hi, positions,
                              cell_eff, rc, idx, tc, tj, tsh)
                for w in range(capacity - p0):
                    centers_out[p0 + w] = tc[w]
                    neighbors_out[p0 + w] = tj[w]
                    shifts_out[p0 + w, 0] = tsh[w, 0]
                    shifts_out[p0 + w, 1] = tsh[w, 1]
                    shifts_out[p0 + w, 2] = tsh[w, 2]


@njit(cache=True, parallel=True)
def _count_par(positions, state, counts_sorted, nchunks):
    # one worker per thread claiming chunks (kernels/cpu/parallel.py: balanced when the
    # VM runs one core slower than the other)
    n_w = max(1, min(nchunks, num_threads()))
    counter = np.full(1, n_w, np.int64)
    for w in prange(n_w):
        ch = np.int64(w)
        while ch < nchunks:
            _count_chunk(ch, nchunks, positions, state, counts_sorted)
            ch = claim(counter)


@njit(cache=True)
def _count_ser(positions, state, counts_sorted, nchunks):
    for ch in range(nchunks):
        _count_chunk(ch, nchunks, positions, state, counts_sorted)


@njit(cache=True, parallel=True)
def _fill_par(positions, state, offsets, capacity, centers_out, neighbors_out,
              shifts_out, nchunks):
    n_w = max(1, min(nchunks, num_threads()))  # as _count_par
    counter = np.full(1, n_w, np.int64)
    for w in prange(n_w):
        ch = np.int64(w)
        while ch < nchunks:
            _fill_chunk(ch, nchunks, positions, state, offsets, capacity,
                        centers_out, neighbors_out, shifts_out)
            ch = claim(counter)


@njit(cache=True)
def _fill_ser(positions, state, offsets, capacity, centers_out, neighbors_out,
              shifts_out, nchunks):
    for ch in range(nchunks):
        _fill_chunk(ch, nchunks, positions, state, offsets, capacity,
                    centers_out, neighbors_out, shifts_out)


@njit(cache=True)
def _offsets_from_counts(perm, counts_sorted):
    n = perm.shape[0]
    counts = np.empty(n, np.int64)
    for t in range(n):
        counts[perm[t]] = counts_sorted[t]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for i in range(n):
        offsets[i + 1] = offsets[i] + counts[i]
    return offsets


@njit(cache=True)
def _empty_state():
    return (np.ones(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.bool_),
            np.zeros((3, 3)), np.zeros((3, 3)), np.empty(0), np.empty(0),
            np.empty(0), np.empty((0, 3), np.int32), np.empty(0, np.int64),
            np.zeros(2, np.int64), 0, 1.0, 1.0, 1.0)


@njit(cache=True)
def search_count(positions, cell, pbc, r_cut):
    """Pass 1.  Returns ``(status, state, offsets)``.

    ``status`` is 0 or a negative ``ERR_*`` code; ``offsets`` (N+1,) int64 is
    the CSR row pointer in ORIGINAL atom order, ``offsets[N]`` = number of
    pairs.  ``state`` is an opaque tuple for :func:`search_fill`.
    """
    n = positions.shape[0]
    code = _validate(positions, cell, pbc, r_cut)
    if code != 0 or n == 0:
        return code, _empty_state(), np.zeros(n + 1, np.int64)
    state = _plan(positions, cell, pbc, r_cut)
    counts_sorted = np.empty(n, np.int64)
    nb = state[0]
    nbins = nb[0] * nb[1] * nb[2]
    if n >= _PARALLEL_MIN_ATOMS:
        _count_par(positions, state, counts_sorted, _n_chunks(nbins))
    else:
        _count_ser(positions, state, counts_sorted, 1)
    offsets = _offsets_from_counts(state[9], counts_sorted)
    return 0, state, offsets


@njit(cache=True)
def search_fill(positions, state, offsets, capacity,
                centers_out, neighbors_out, shifts_out):
    """Pass 2: write the pairs (CSR order) and pad; returns the true count.

    At most ``capacity`` pairs are written (pairs ``[0, capacity)`` of the
    full CSR list); entries ``[n_pairs, capacity)`` get centre = neighbour = N
    and shift 0.
    """
    n = positions.shape[0]
    cap = min(capacity, centers_out.shape[0], neighbors_out.shape[0],
              shifts_out.shape[0])
    if cap < 0:
        cap = 0
    total = offsets[n]
    if n > 0 and cap > 0:
        nb = state[0]
        nbins = nb[0] * nb[1] * nb[2]
        if n >= _PARALLEL_MIN_ATOMS:
            _fill_par(positions, state, offsets, cap, centers_out,
                      neighbors_out, shifts_out, _n_chunks(nbins))
        else:
            _fill_ser(positions, state, offsets, cap, centers_out,
                      neighbors_out, shifts_out, 1)
    for p in range(total, cap):
        centers_out[p] = n
        neighbors_out[p] = n
        shifts_out[p, 0] = 0
        shifts_out[p, 1] = 0
        shifts_out[p, 2] = 0
    return total


@njit(cache=True)
def count_and_fill(positions, cell, pbc, r_cut, capacity,
                   centers_out, neighbors_out, shifts_out):
    """Full neighbour list into preallocated buffers.

    positions: (N, 3) float64 or float32 (unwrapped); cell: (3, 3) rows =
    lattice vectors; pbc: (3,) bool; r_cut: float; capacity: int;
    centers_out, neighbors_out: (capacity,) int32; shifts_out: (capacity, 3)
    int32.

    Returns the TRUE number of pairs ``n_pairs`` (which may exceed
    ``capacity``: then only the first ``capacity`` pairs of the CSR list were
    written and the caller must reallocate), or a negative ``ERR_*`` code for
    invalid input.  Entries ``[n_pairs, capacity)`` are padding: centre =
    neighbour = N, shift = 0.
    """
    code, state, offsets = search_count(positions, cell, pbc, r_cut)
    if code != 0:
        return code
    return search_fill(positions, state, offsets, capacity,
                       centers_out, neighbors_out, shifts_out)


# --------------------------------------------------------------------------
# host convenience
# --------------------------------------------------------------------------
_ERR_MESSAGES = {
    ERR_NONFINITE: "positions (or a periodic cell vector) contain NaN or inf",
    ERR_CELL: "cell is singular / degenerate along the periodic directions",
    ERR_RCUT: "r_cut must be a finite number > 0",
    ERR_TOO_MANY_IMAGES: (
        "cell is too thin along a periodic direction for this r_cut "
        f"(more than {_MAX_IMAGES} periodic images would be needed)"
    ),
}


def _host_inputs(positions, cell, pbc, r_cut):
    positions = np.asarray(positions)
    if positions.dtype not in (np.float32, np.float64):
        positions = positions.astype(np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {positions.shape}")
    if positions.shape[0] >= 2**31 - 1:
        raise ValueError("too many atoms for int32 indices")
    positions = np.ascontiguousarray(positions)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if cell is None:
        cell = np.zeros((3, 3))
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (3,):
        cell = np.diag(cell)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    cell = np.ascontiguousarray(cell)
    try:
        r_cut = float(r_cut)
    except (TypeError, ValueError):
        raise ValueError(f"r_cut must be a number, got {r_cut!r}") from None
    return positions, cell, pbc, r_cut


def _raise_for(code, positions, cell, pbc, r_cut):
    msg = _ERR_MESSAGES.get(code, f"neighbour search failed with code {code}")
    if code == ERR_NONFINITE:
        bad = np.argwhere(~np.isfinite(positions))
        if len(bad):
            msg += f" (first bad atom index {bad[0, 0]})"
    elif code == ERR_CELL:
        msg += f" (pbc={pbc.tolist()}, cell={cell.tolist()})"
    elif code == ERR_RCUT:
        msg += f" (got {r_cut!r})"
    raise ValueError(msg)


# glibc's malloc recycles blocks below its largest mmap threshold (32 MiB on 64-bit);
# larger ones are fresh mmaps on every call, as ours would be without the pool
_MMAP_MIN_BYTES = 32 << 20
_pool_lock = threading.Lock()
_pool: list = []  # the last _POOL_SIZE large output buffers (uint8 arrays on mmaps)
_POOL_SIZE = 2


def _pooled_raw(nbytes):
    """A uint8 array of >= ``nbytes`` on an anonymous mmap, recycled when idle.

    A fresh 0.4-1 GB buffer is written once per build: its first-touch page faults (and,
    with transparent huge pages, the kernel's direct compaction) cost 0.4-6 s per build
    at 10^6 atoms on the 2-core VM (2026-12-02, same process, alternating builds), more
    than the search itself; the heap recycles the buffers of small lists the same way.
    The last two large buffers are kept and handed out again once no array from them is
    alive: two, because ``pairs = neighbor_pairs(...)`` in a loop builds the new list
    while the old one still lives.  Every view's ``.base`` is the pooled array (numpy
    collapses view chains to the owner; zero-copy jax arrays hold a reference too), so
    a reference count of 2 (the pool's and ``getrefcount``'s argument) means idle.
    :func:`release_output_buffers` frees the idle ones.
    """
    with _pool_lock:
        best = None
        for k in range(len(_pool)):
            # the pool's reference and getrefcount's argument: no array alive
            if sys.getrefcount(_pool[k]) == 2 and _pool[k].nbytes >= nbytes and (
                    best is None or _pool[k].nbytes < _pool[best].nbytes):
                best = k
        if best is not None:
            return _pool[best][:nbytes]  # a view: the pool's count rises while it lives
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # 2 MiB pages: 512x fewer first-touch faults of this write-once buffer.
            buf.madvise(mmap.MADV_HUGEPAGE)
        _pool.append(np.frombuffer(buf, np.uint8))
        del _pool[:-_POOL_SIZE]  # a busy buffer dropped here lives on with its arrays
        return _pool[-1][:nbytes]


def release_output_buffers():
    """Stop keeping the large output buffers for later builds (see ``_pooled_raw``).

    Idle ones are freed at once, busy ones when their last array dies.
    """
    with _pool_lock:
        _pool.clear()


def _alloc_pairs(total):
    """Output arrays (P,), (P,), (P, 3) int32.

    Large outputs (>= 32 MiB; ~1 GB at 10^6 atoms, r_cut 5) are carved out of one
    anonymous mmap advised for transparent huge pages and recycled by ``_pooled_raw``:
    the fill pass writes every byte once, and with 4 KiB pages its first-touch faults
    were the main cost that grows from 10^4 to 10^6 atoms (MADV_HUGEPAGE measured
    2026-12-01 on the 2-core VM, random atoms at density 0.1: 10^6 atoms 15-20% faster
    at r_cut 3.5 and 5 Å), and on fresh huge pages the kernel's compaction stalls some
    builds for seconds.  The arrays are ordinary writeable numpy arrays.
    """
    nbytes = 20 * total
    if nbytes < _MMAP_MIN_BYTES:
        return (np.empty(total, np.int32), np.empty(total, np.int32),
                np.empty((total, 3), np.int32))
    raw = _pooled_raw(nbytes)
    centers = raw[:4 * total].view(np.int32)
    neighbors = raw[4 * total:8 * total].view(np.int32)
    shifts = raw[8 * total:].view(np.int32).reshape(total, 3)
    return centers, neighbors, shifts


def neighbor_pairs_numba(positions, cell, pbc, r_cut):
    """ASE-compatible ``ijS`` neighbour list, exactly sized.

    Returns ``(i, j, S)``: int32 arrays of shapes (P,), (P,), (P, 3), sorted
    by centre ``i`` (CSR order).  Raises ValueError for NaN/inf positions,
    a degenerate cell along a periodic direction, or r_cut <= 0.
    """
    positions, cell, pbc, r_cut = _host_inputs(positions, cell, pbc, r_cut)
    code, state, offsets = search_count(positions, cell, pbc, r_cut)
    if code != 0:
        _raise_for(code, positions, cell, pbc, r_cut)
    total = int(offsets[-1])
    centers, neighbors, shifts = _alloc_pairs(total)
    n_written = search_fill(positions, state, offsets, total,
                            centers, neighbors, shifts)
    assert n_written == total
    return centers, neighbors, shifts
