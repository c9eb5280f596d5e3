"""Numba CPU kernels: spherical Bessel descriptors and their derivatives.

Pure numba/numpy (no JAX here).  Every kernel has the XLA-FFI calling
convention of :mod:`neuralil_fast.kernels.ffi`: ``impl(*inputs, *outputs)``,
writes every element of every output, never writes its inputs.

Inputs shared by all kernels (the pair layout of ``neuralil_fast.neighbors``):

    displacements    (P, 3) float   x_j + S @ cell - x_i
    offsets          (N+1,) int32   CSR start of each centre's run of pairs, non-decreasing
                                    (pairs offsets[i] .. offsets[i+1]-1 belong to centre i);
                                    see :func:`offsets_from_centers`
    neighbor_species (P,) int32     species index of j, 0..S-1

followed by the 9 tables of :func:`make_tables` (``*tables``), then the kernel's
own inputs, then its outputs:

    descriptors_fwd(displacements, offsets, neighbor_species, *tables,
                    X, A)
        X (N, n_features): the power spectrum p^{ab}_{nl} (a <= b pair-major, nl-minor)
        A (N, S, n_nlm):   the residual: the density coefficients A^a_{nlm} (nlm in the
                           order of DescriptorSpec.nlm_tables(): l-major (n,l), then
                           m = -l..l), laid out lane-major per work item (see "Residual";
                           density_from_residual gives descriptors.density_coefficients).
    descriptors_vjp(displacements, offsets, neighbor_species, *tables, A, X_bar,
                    d_bar)
        X_bar (C, N, n_features): C cotangents; d_bar (C, P, 3), d_bar[c] =
        d/d(displacements) of sum(X_bar[c] * X); zero on rows outside every centre's run,
        on padding and on pairs with r == 0 or r >= r_cut.
    descriptors_jvp(displacements, offsets, neighbor_species, *tables, A, d_dot,
                    X_dot)
        d_dot (C, P, 3): C tangents; X_dot (C, N, n_features), X_dot[c] =
        dX/d(displacements) . d_dot[c] (also the transpose of the vjp in X_bar: used for
        double backward).
        The C cotangents (tangents) share one pass over the pairs: the radial and angular
        functions and their derivatives, most of a pair's work, are computed once for all
        of them (a committee's members: one call instead of C).

All float arrays of one call share the displacements' dtype (float32 or float64), except
the radial tables (1-4), which are float64 where the Bessel path reads them (float64
kernels, and float32 ones above n_max = 13; see Precision).

Residual: A (N, S, n_nlm), written by the forward pass and read by both derivative
kernels.  It is stored as the kernels use it: work item ch (centres c0 = 64 ch ..
c0 + nc - 1) owns the flat stretch from c0 S n_nlm, holding A^s_q of its lane k (the
centre c0 + order[k], order from the pair counts, see _chunk_lanes) at
(s n_nlm + q) nc + k; no transposition in either pass.  It is O(N) memory (55 numbers
per species per atom for n_max = 4).  The
per-pair derivative tensor dA/dd would be O(P * n_nlm * 3) (about 50x larger, and
streaming it would cost more than recomputing it); the vjp/jvp recompute the per-pair
radial and angular functions and their derivatives from the displacements instead.

Validity: a pair contributes only when 0 < r < r_cut (r^2 computed in float64 from the
given components and compared with r_cut^2 in float64, as the float64 reference does);
other pairs and species outside 0..S-1 are ignored (zero contribution, zero gradient).
Offsets are clamped to [0, P]; offsets that are not non-decreasing give unspecified
(but memory-safe, fully written) results.

Precision: f_nl = c1 j_l(a r) - c2 j_l(b r) vanishes at r_cut (to third order) by
cancellation, so the Bessel sum evaluated in float32 has absolute errors ~1e-7 of its
individual terms, which near r_cut exceeded 1e-5 of the largest gradient in small test
systems.  So: float64 kernels evaluate the Bessel sum in float64 (the Bessel path);
float32 kernels evaluate g = r^l (r_cut^2 - r^2)^3 H(t) and g' = r^(l-1) (r_cut^2 - r^2)^2
K(t) with float32 Chebyshev polynomials H, K fitted in make_tables (the polynomial path,
see _radial_polynomials): the zeros sit in exact factors, so errors stay relative near
r_cut and near 0 (~1e-6 of each function at most, from rounding t), at ~3 flops per degree
instead of a float64 sincos per Bessel argument.  Where the polynomials would need a
degree above 32 (n_max > 13) float32 kernels take the Bessel path in float64 too.
Everything else (Y_lm, accumulation of A, the contractions) runs in the input dtype.

Implementation
--------------
Parallel over work items of ``_W`` = 64 consecutive centres: one worker per thread
(``prange``), each claiming the next item when it is done with one (kernels/cpu/parallel.py:
numba's static split made the fast thread wait whenever the VM slowed the other down),
its scratch allocated once for all its items.  Inside one,
the centres are lanes: sorted by decreasing pair count (counting sort), taken 16 at a
time as a group, and a group's pairs are processed as rows (row j = pair j of each of its
16 centres; centres with fewer pairs leave padding slots), 4 rows to a block of ``_B`` =
64 slots.  The per-slot work (sin/cos, Bessel recurrences or radial polynomials, Y_lm
and its gradient, the vjp/jvp contractions) runs in structure-of-arrays scratch, in
64-wide loops over slots that LLVM vectorises (AVX-512 here; shorter loops end up in
scalar remainder loops).  Because a row's slots belong to 16 consecutive centres of the
chunk's centre-minor accumulator At[s, q, k], a slot's 55 contributions move to or from
its centre with 16-lane vector FMAs masked by species (``simd.lanes_scatter_products``
/ ``lanes_gather``, explicit vector code: S x the adds of a scalar scatter, at 1/16 of the
instructions; the contributions g Y are formed in registers on the way) instead of 55
scalar read-modify-writes per pair.  Sorting keeps the
padding small (5-10% of the slots for EAN at 3.5 Å; ~20% unsorted).  Each centre still
sums its own pairs in CSR order, so results do not depend on the lane order.  The
per-centre contractions (power spectrum, its jvp) run on At, vectorised over the 64
lanes.

j_l(x): above the reference's per-l threshold, one branch-free, vectorisable sincos per
distinct argument x = u_{l,k} r / r_c (Cody-Waite reduction, fdlibm polynomials; for
l = 0 the arguments are (k+1) pi r / r_c, so a single sincos and angle addition serve all
k), then the upward recurrence to j_l (compiled per literal l < 8 so that the loop over
pairs is innermost; a generic loop above); below it, the power series (a scalar fix-up,
run only for blocks that hold a pair with small x).  j_l'(x) = j_{l-1}(x) - (l+1)/x j_l(x)
(j_0' = -j_1), and the differentiated series below the threshold.  Y_lm: polynomials in
the unit vector (same normalisation and m order as ``basis.real_spherical_harmonics``),
gradient projected with (I - u u^T)/r.
"""
from __future__ import annotations

import math

import numpy as np
from numba import literally, njit, prange

from .parallel import claim, num_threads
from .simd import (MAX_SPECIES, clenshaw_rows, lanes_abar, lanes_gather, lanes_power_spectrum,
                   lanes_scatter_products, lanes_to_rows, rows_to_lanes)
from .ylm_unrolled import ylm_1, ylm_2, ylm_3, ylm_4, ylm_5, ylm_6

__all__ = ["make_tables", "descriptors_fwd", "descriptors_vjp", "descriptors_jvp",
           "n_nlm_of", "offsets_from_centers", "density_from_residual", "flop_counts",
           "flop_counts_of", "forward", "vjp", "jvp"]

# contract: allow FMA contraction (more accurate, not less); no reassociation, no finite-math.
_JIT = dict(cache=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
_B = 64  # slots per block (structure-of-arrays width; LLVM vectorises 64-trip loops fully)
_G = 16  # lanes: consecutive (sorted) centres whose pairs share a row of a block
_R = _B // _G  # rows per block
_W = 64  # centres (lanes) per parallel work item; loops over them have this constant trip
# count (LLVM vectorises 64-trip loops 16 x 4 wide; shorter runtime trip counts end up in
# the scalar remainder loop)
_L_SPECIAL = 8  # Bessel recurrences specialised for l < _L_SPECIAL (generic loop above)

# consts (input dtype): see make_tables
_C_RCUT2, _C_ZERO, _C_ONE, _C_TWO = range(4)
# rconsts (float64, or float32 on the float32 polynomial path: see make_tables)
_R_TWO_OVER_PI, _R_P1, _R_P2, _R_P3, _R_HALF, _R_ONE, _R_RCUT2, _R_DUMMY = range(8)
_R_SIN = 8  # 6 coefficients
_R_COS = 14  # 6 coefficients
_R_INT = 20  # float(k) for k = 0 .. 2 L + 2
# fdlibm __kernel_sin / __kernel_cos coefficients on [-pi/4, pi/4]
_SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
        2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
        -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
# pi/2 = _P1 + _P2 + _P3 (Cody-Waite).  _P1 and _P2 are short (float32-exact, n * _P1 and
# n * _P2 exact), _P3 carries the rest: accurate in float64, and still accurate when a
# caller rounds the float64 tables to float32 (JAX without x64 cannot hold float64 arrays).
_P1 = 1.5703125
_P2 = 4.837512969970703125e-4
_P3 = 7.549789954891882e-08  # pi/2 - _P1 - _P2 to 1e-24


# ---------------------------------------------------------------------------
# Host-side tables


def n_nlm_of(n_max: int) -> int:
    """Length of the (n, l, m) axis: sum_l (n_max - l + 1)(2l + 1)."""
    return sum((n_max - l + 1) * (2 * l + 1) for l in range(n_max + 1))


def _series_terms(l_max: int, thresholds) -> int:
    """Terms of the j_l power series in x^2 such that the tail is < 1e-18 relative at x = threshold."""
    k_needed = 1
    for l in range(l_max + 1):
        x2 = thresholds[l] ** 2
        term = 1.0
        k = 0
        while term > 1e-18:
            k += 1
            term *= x2 / (2.0 * k * (2 * l + 2 * k + 1))
        k_needed = max(k_needed, k + 1)
    return k_needed


def make_tables(n_max: int, r_cut: float, n_species: int, dtype=np.float64) -> tuple:
    """The constant tables the kernels take after the pair inputs, in this order:

    0 consts     (2L+4,) dtype      [r_cut^2, 0, 1, 2, 3, ...]: float(k), k = 0 .. 2L+2, from slot 1
                                    (so that no arithmetic leaves the dtype)
    1 rconsts    (20+2L+3,) rdtype  2/pi, pi/2 in three parts (Cody-Waite), 1/2, 1, r_cut^2,
                                    a dummy radius (r_cut/2) for empty slots, 6 sin and 6 cos
                                    polynomial coefficients, then float(k), k = 0 .. 2L+2
    2 roots      (L, n_max+2) rdtype   u_{l,k} / r_cut (row l valid for k <= n_max-l+1),
                                    L = n_max+1
    3 W          (L, n_max+1, n_max+2) rdtype   g_nl(r) = sum_k W[l,n,k] j_l(roots[l,k] r):
                                    T_l @ [c1 on the diagonal, -c2 on the superdiagonal]
                                    / r_cut^1.5 (nonzero for k <= n+1)
    4 series     (L, 3, K) rdtype     [l,0]: j_l(x) = x^l sum_k series[l,0,k] x^(2k);
                                    [l,1]: j_l'(x) = x^(l-1) sum_k series[l,1,k] x^(2k) (l >= 1),
                                           j_0'(x) = x sum_k series[0,1,k] x^(2k);
                                    [l,2,0]: the threshold below which the series is used
                                    (the reference's, basis._series_threshold)
    5 ylm        (L, L, 3) dtype    [norm_lm (x sqrt 2 for m > 0), (2l-1)/(l-m), (l+m-1)/(l-m)]:
                                    Y normalisation and Q_l^m = a z Q_{l-1}^m - b Q_{l-2}^m
    6 nl_index   (L, n_max+1, 4) int32  [column of (n,l) on the nl axis, start of its m run
                                    on the nlm axis, degree of its g and g' polynomials (8)]
    7 pair_index (S, S) int32       species block of (min(a,b), max(a,b)) in the features
    8 poly       (n_nl, 2, D+1) dtype  float32 only (shape (0, 2, 1) otherwise, or when the
                                    degree would exceed 32): Chebyshev coefficients in
                                    t = 2 r^2 / r_cut^2 - 1 of H and K with
                                    g_nl(r) = r^l (r_cut^2 - r^2)^3 H_nl(t),
                                    g_nl'(r) = r^(l-1) (r_cut^2 - r^2)^2 K_nl(t), r^1 for l = 0
                                    (see _radial_polynomials)

    Computed in float64 from ``neuralil_fast.basis.radial_basis``; ``dtype`` (float32 or
    float64) must be the displacements' dtype.  rdtype: float64, except float32 with
    polynomials (``poly`` non-empty): that path reads only r_cut^2, 1 and the dummy radius
    from tables 1-4 (the validity test and r_cut^2 - r^2 stay in float64 arithmetic, see
    _poly_block), so float32 serves it, and then every
    float32 caller (JAX with or without x64) runs one compiled variant with the same
    results; each table layout is a numba compilation of the three kernels (minutes).
    """
    from neuralil_fast.basis import _series_threshold, radial_basis

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if n_species < 1:
        raise ValueError(f"need at least one species, got {n_species}")
    basis = radial_basis(int(n_max), float(r_cut))
    n_max = basis.n_max
    rc = basis.r_cut
    L = n_max + 1
    ints = [float(k) for k in range(2 * L + 3)]
    consts = [rc * rc] + ints
    assert consts[_C_ZERO] == 0.0 and consts[_C_ONE] == 1.0 and consts[_C_TWO] == 2.0
    rconsts = [2.0 / math.pi, _P1, _P2, _P3, 0.5, 1.0, rc * rc, 0.5 * rc, *_SIN, *_COS]
    assert len(rconsts) == _R_INT
    rconsts += ints
    roots = basis.roots / rc
    W = np.zeros((L, n_max + 1, n_max + 2))
    for l in range(L):
        m = n_max - l + 1
        C = np.zeros((m, m + 1))
        for n in range(m):
            C[n, n] = basis.c1[l, n]
            C[n, n + 1] = -basis.c2[l, n]
        W[l, :m, : m + 1] = basis.transforms[l] @ C / rc**1.5
    thresh = np.array([_series_threshold(l) for l in range(L)])
    K = _series_terms(n_max, thresh)
    series = np.zeros((L, 3, K))
    for l in range(L):
        coef = np.zeros(K + 1)
        coef[0] = 1.0 / math.prod(range(1, 2 * l + 2, 2))
        for k in range(1, K + 1):
            coef[k] = -coef[k - 1] / (2.0 * k * (2 * l + 2 * k + 1))
        series[l, 0] = coef[:K]
        if l == 0:
            series[l, 1] = coef[1: K + 1] * 2.0 * np.arange(1, K + 1)
        else:
            series[l, 1] = coef[:K] * (l + 2.0 * np.arange(K))
        series[l, 2, 0] = thresh[l]
    ylm = np.zeros((L, L, 3))
    for l in range(L):
        for m in range(l + 1):
            v = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
            ylm[l, m, 0] = v * (math.sqrt(2.0) if m > 0 else 1.0)
            if l >= m + 2:
                ylm[l, m, 1] = (2 * l - 1) / (l - m)
                ylm[l, m, 2] = (l + m - 1) / (l - m)
    nl_index = np.zeros((L, n_max + 1, 4), np.int32)
    c = 0
    off = 0
    for l in range(L):
        for n in range(n_max - l + 1):
            nl_index[l, n, :2] = (c, off)
            c += 1
            off += 2 * l + 1
    poly = np.zeros((0, 2, 1))
    if dtype == np.float32:
        fit = _radial_polynomials(roots, W, rc, n_max)
        if fit is not None:
            poly, degrees = fit
            nl_index[:, :, 2:] = degrees
    pair_index = np.zeros((n_species, n_species), np.int32)
    q = 0
    for a in range(n_species):
        for b in range(a, n_species):
            pair_index[a, b] = pair_index[b, a] = q
            q += 1
    f = lambda x: np.ascontiguousarray(x, dtype=dtype)
    rf = lambda x: np.ascontiguousarray(x, dtype=np.float32 if len(poly) else np.float64)
    return (f(consts), rf(rconsts), rf(roots), rf(W), rf(series), f(ylm), nl_index,
            pair_index, f(poly))


_POLY_DEGREES = tuple(range(4, 33, 2))  # degrees the fit tries (simd.clenshaw_rows takes any)
_POLY_TOL = 2e-8  # weighted fit error / max |g| (|g'|), see _radial_polynomials: < float32 ulp


def _radial_polynomials(roots, W, r_cut: float, n_max: int):
    """(poly (n_nl, 2, D+1), degrees (L, n_max+1, 2)) for the float32 radial functions, or None.

    g_nl = sum_k W j_l(u_k r) has a triple zero at r_cut (f_nl = c1 j_l(u1 r) - c2 j_l(u2 r)
    with j_l(u1 r_cut) = j_l(u2 r_cut) = 0 and f' = 0 by construction; Bessel's equation then
    gives f'' = -2 f'/r = 0) and is r^l times an even entire function, so
    g_nl = r^l q^3 H_nl(s) and g_nl' = r^(l-1) q^2 K_nl(s) (l >= 1; r q^2 K_0(s) for l = 0)
    with s = r^2, q = r_cut^2 - s, H and K entire.  Fitted in float64 at Chebyshev nodes in
    t = 2 s / r_cut^2 - 1, each to the lowest degree of _POLY_DEGREES whose error on a fine
    grid of r is below _POLY_TOL of the function's maximum, weighted as the function
    vanishes.  Why: a float32 evaluation of the Bessel sum cancels to absolute errors of
    ~1e-7 of its O(1) terms near r_cut, where g vanishes; with all of the zero in the factor
    (H(1) != 0; with only q^2, H(1) ~ 1e-8 max|H| and float32 coefficients lose it) the error
    stays proportional to g (relative near r_cut) and to r^l (near 0), and costs ~3 flops per
    degree instead of a sincos per Bessel argument.  None when some function would need a
    degree above 32 (large n_max): the kernels then use the Bessel path.
    """
    from scipy.special import spherical_jn

    cheb = np.polynomial.chebyshev
    L = n_max + 1
    rc2 = r_cut * r_cut
    # up to 0.99 r_cut: closer, float64 g / q^3 is noise (H is smooth there, so the fit holds)
    grid = np.linspace(0.0, 0.99 * r_cut, 4001)[1:]
    coefs = {}
    degrees = np.zeros((L, n_max + 1, 2), np.int32)
    for l in range(L):
        for n in range(n_max - l + 1):
            ks = range(n + 2)

            def fn(r, which):
                if which == 0:
                    return sum(W[l, n, k] * spherical_jn(l, roots[l, k] * r) for k in ks)
                return sum(W[l, n, k] * roots[l, k] * spherical_jn(l, roots[l, k] * r, True)
                           for k in ks)

            def factor(r, which):
                q = rc2 - r * r
                return r**l * q**3 if which == 0 else r ** (l - 1 if l else 1) * q * q

            for which in (0, 1):
                exact = fn(grid, which)
                # the error of H (K) times r^l rc^6 (r^(l-1) rc^4): that of g (g') where q is
                # largest, and proportionally smaller near r_cut, where g -> 0
                zeros = 3 - which
                weight = factor(grid, which) * (rc2 / (rc2 - grid * grid)) ** zeros
                h = exact / factor(grid, which)
                bound = _POLY_TOL * np.max(np.abs(exact))
                for D in _POLY_DEGREES:
                    m = 2 * D + 8
                    t = np.cos(np.pi * (np.arange(m) + 0.5) / m)
                    r = np.sqrt((t + 1.0) * (0.5 * rc2))
                    # float64 g / q^3 at nodes near r_cut carries ~1e-16 / q^3 of noise (the
                    # roots and c1/c2 are rounded): weight those nodes down to their accuracy
                    w = np.minimum(1.0, ((rc2 - r * r) / (0.02 * rc2)) ** zeros)
                    c = cheb.chebfit(t, fn(r, which) / factor(r, which), D, w=w)
                    approx = cheb.chebval(grid * grid * (2.0 / rc2) - 1.0, c)
                    if np.max(np.abs(approx - h) * weight) < bound:
                        break
                else:
                    return None
                coefs[l, n, which] = c
                degrees[l, n, which] = D
    n_nl = L * (L + 1) // 2
    poly = np.zeros((n_nl, 2, int(degrees.max()) + 1))
    col = 0
    for l in range(L):
        for n in range(n_max - l + 1):
            for which in (0, 1):
                c = coefs[l, n, which]
                poly[col, which, : len(c)] = c
            col += 1
    return poly, degrees


def offsets_from_centers(centers, n_atoms: int) -> np.ndarray:
    """(N+1,) int32 CSR offsets of centre-sorted ``centers`` (padding = n_atoms falls after)."""
    return np.searchsorted(np.asarray(centers), np.arange(n_atoms + 1), side="left").astype(np.int32)


def flop_counts(n_max: int = 4, n_species: int = 4, degrees=None) -> dict:
    """Analytic counts of the flops the kernels execute, {kernel: (per pair, per centre)}.

    ``degrees``: None for the Bessel path (float64), or the polynomial degrees of the
    float32 path, ``make_tables(...)[6][..., 2:]`` (L, n_max+1, 2).
    FMA = 2 flops; add, multiply, divide, sqrt, compare, select = 1.  For n_max = 4, S = 4,
    Bessel path: forward 1122 / 1100, vjp 1664 / 2000, jvp 1596 / 2200 (per pair / per
    centre); float32 polynomial path (its degrees do not depend on r_cut): forward 772,
    vjp 1799, jvp 1731 per pair.
    Every pair slot of a block is computed (padding slots of a chunk's last block included,
    not counted here); the rare series fix-up for small x is not counted.

    Per pair (L = n_max + 1; Bessel arguments u_{l,k} r / r_c, k = 0 .. n_max-l+1):
      geometry: r^2 (5), validity (4), sqrt, 1/r, unit vector (3)                  = 14
      one sincos (Cody-Waite reduction 8, sin poly 14, cos poly 15, quadrant 2)    = 39
      l = 0 (one sincos for all k): x = u r, sincos; per k: angle addition (6, k > 0),
        1/x (2), j_0 (1), u j_0' = -u j_1 (3)
      l >= 1, per k: x = u r (1), sincos (39), 1/x, j_0, j_1 (4), l-1 recurrence steps (3 each),
        u j_l' = u (j_{l-1} - (l+1)/x j_l) (4)
      radial combination g = W j: 2 sum_l sum_n (n+2) - n_nl   (the same again for dg)
      (polynomial path instead of the above: t, q: 4; scale factors 6 per l (5 for l = 0);
       per function of degree D: 3 D + 2 (Clenshaw 3 per step, 2t, final scale))
      Y_lm: C_m, S_m (6 per m); Legendre Q: 4 per (l,m) with l >= m+2, 1 for l = m+1;
        Y: 1 per m = 0 entry, 3 per +-m pair; gradient (vjp, jvp): dQ 5 per (l,m) with
        l >= m+2, dY 1 per m = 0 entry, 9 per +-m pair
      forward: contributions g Y (n_nlm) and their scatter-add (n_nlm)
      vjp: t = sum dg (A_bar Y) (3 n_nlm), G_lm = sum_n A_bar g (2 n_nlm); v = sum_lm G grad Y
        (6 L^2); d_bar = u t + (v - u (u.v)) / r (17)
      jvp: rho = u.d_dot, tangent (14); Y_t = grad Y . tangent (5 L^2); dg rho (n_nl);
        contributions dg rho Y + g Y_t (3 n_nlm) and scatter-add (n_nlm)
    Per centre (S species, n_sp = S(S+1)/2 blocks, n_nl = L(L+1)/2):
      forward: p^{ab} = sum_m A^a A^b: 2 n_sp n_nlm
      vjp: A_bar^a = sum_b w X_bar^{ab} A^b: 2 S^2 n_nlm + S^2 n_nl
      jvp: X_dot = sum_m (A_dot^a A^b + A^a A_dot^b): 4 n_sp n_nlm
    """
    L = n_max + 1
    n_nl = L * (L + 1) // 2
    n_nlm = n_nlm_of(n_max)
    n_sp = n_species * (n_species + 1) // 2
    sincos = 39
    radial = 1 + sincos + sum((6 if k > 0 else 0) + 6 for k in range(n_max + 2))
    radial += sum(1 + sincos + 4 + 3 * (l - 1) + 4 for l in range(1, L) for _ in range(n_max - l + 2))
    wj = sum(2 * (n + 2) - 1 for l in range(L) for n in range(n_max - l + 1))
    n_pm = (L * L - L) // 2  # +-m pairs
    qrec = sum(4 if l >= m + 2 else (1 if l == m + 1 else 0) for m in range(L) for l in range(m, L))
    dqrec = sum(5 if l >= m + 2 else 0 for m in range(L) for l in range(m, L))
    y = 6 * (L - 1) + qrec + L + 3 * n_pm
    dy = dqrec + L + 9 * n_pm
    geom = 14
    rad_g, rad_dg = radial + wj, radial + 2 * wj
    if degrees is not None:
        degrees = np.asarray(degrees)
        base = 4 + 6 * L - 1
        per = [(3 * int(degrees[l, n, w]) + 2) for l in range(L) for n in range(n_max - l + 1)
               for w in (0, 1)]
        rad_g = base + sum(per[0::2])
        rad_dg = base + sum(per)
    fwd = geom + rad_g + y + 2 * n_nlm
    vjp = geom + rad_dg + y + dy + 5 * n_nlm + 6 * L * L + 17
    jvp = geom + rad_dg + y + dy + 14 + 5 * L * L + n_nl + 4 * n_nlm
    return {
        "forward": (fwd, 2 * n_sp * n_nlm),
        "vjp": (vjp, 2 * n_species**2 * n_nlm + n_species**2 * n_nl),
        "jvp": (jvp, 4 * n_sp * n_nlm),
    }


# ---------------------------------------------------------------------------
# Per-block functions (structure of arrays over _B pairs)


@njit(**_JIT)
def _geometry(rconsts, S, r, ux, uy, uz, ir, wx, wy, wz, irt, valid, spc):
    """Geometry of the block's slots from the displacements in (ux, uy, uz): r, 1/r, unit
    vector in float64 (r, ir, ux, uy, uz) and in the input dtype (irt, wx, wy, wz); padding
    (spc = -1) and invalid slots get a dummy radius, u = (0, 0, 1), species 0 and
    valid = False.  Returns the smallest valid r."""
    rc2 = rconsts[_R_RCUT2]
    dummy = rconsts[_R_DUMMY]
    dummy2 = dummy * dummy
    # branch-free, vectorised
    for b in range(_B):
        dx = ux[b]
        dy = uy[b]
        dz = uz[b]
        s = spc[b]
        r2 = dx * dx + dy * dy + dz * dz
        ok = (r2 > 0.0) & (r2 < rc2) & (s >= 0) & (s < S)
        rr = math.sqrt(r2 if ok else dummy2)
        inv = 1.0 / rr
        x = dx * inv if ok else 0.0
        y = dy * inv if ok else 0.0
        z = dz * inv if ok else 1.0
        r[b] = rr
        ir[b] = inv
        ux[b] = x
        uy[b] = y
        uz[b] = z
        wx[b] = x
        wy[b] = y
        wz[b] = z
        irt[b] = inv
        valid[b] = ok
        spc[b] = s if ok else 0
    rmin = dummy
    for b in range(_B):
        if valid[b]:
            rmin = min(rmin, r[b])
    return rmin


@njit(**_JIT)
def _jrow(l, u, r, rc, jv, djv, k):
    """jv[k, b] = j_l(u r_b), djv[k, b] = u j_l'(u r_b) on the recurrence branch, for every slot.

    ``l`` is a literal (one compiled variant per l): the recurrence is unrolled and the
    loop over pairs is innermost, so it vectorises."""
    l = literally(l)
    one = rc[_R_ONE]
    half = rc[_R_HALF]
    tpi = rc[_R_TWO_OVER_PI]
    p1 = rc[_R_P1]
    p2 = rc[_R_P2]
    p3 = rc[_R_P3]
    s1 = rc[_R_SIN]
    s2 = rc[_R_SIN + 1]
    s3 = rc[_R_SIN + 2]
    s4 = rc[_R_SIN + 3]
    s5 = rc[_R_SIN + 4]
    s6 = rc[_R_SIN + 5]
    c1 = rc[_R_COS]
    c2 = rc[_R_COS + 1]
    c3 = rc[_R_COS + 2]
    c4 = rc[_R_COS + 3]
    c5 = rc[_R_COS + 4]
    c6 = rc[_R_COS + 5]
    lp1 = rc[_R_INT + l + 1]
    nB = r.shape[0]
    for b in range(nB):
        x = u * r[b]
        n = np.floor(x * tpi + half)
        y = ((x - n * p1) - n * p2) - n * p3
        z = y * y
        sy = y + y * z * (s1 + z * (s2 + z * (s3 + z * (s4 + z * (s5 + z * s6)))))
        cy = one - half * z + z * z * (c1 + z * (c2 + z * (c3 + z * (c4 + z * (c5 + z * c6)))))
        q = np.int32(n)
        sn = cy if (q & 1) else sy
        cs = sy if (q & 1) else cy
        sn = -sn if (q & 2) else sn
        cs = -cs if ((q + 1) & 2) else cs
        iv = one / x
        ja = sn * iv
        jb = (ja - cs) * iv
        for t in range(1, l):
            jn = rc[_R_INT + 2 * t + 1] * iv * jb - ja
            ja = jb
            jb = jn
        if l == 0:
            jv[k, b] = ja
            djv[k, b] = -jb * u
        else:
            jv[k, b] = jb
            djv[k, b] = (ja - lp1 * iv * jb) * u


@njit(**_JIT)
def _jrow0_all(r, rc, roots, jv, djv, s1, c1, sk, ck):
    """l = 0, all k: the arguments are (k+1) theta with theta = pi r / r_c, so one sincos gives
    sin((k+1) theta), cos((k+1) theta) by angle addition (error ~ (k+1) ulp); then
    jv[k] = j_0(x) = sin x / x, djv[k] = u_k j_0'(x) = -u_k j_1(x)."""
    n_max = roots.shape[0] - 1
    nB = r.shape[0]
    one = rc[_R_ONE]
    half = rc[_R_HALF]
    tpi = rc[_R_TWO_OVER_PI]
    p1 = rc[_R_P1]
    p2 = rc[_R_P2]
    p3 = rc[_R_P3]
    q1 = rc[_R_SIN]
    q2 = rc[_R_SIN + 1]
    q3 = rc[_R_SIN + 2]
    q4 = rc[_R_SIN + 3]
    q5 = rc[_R_SIN + 4]
    q6 = rc[_R_SIN + 5]
    k1 = rc[_R_COS]
    k2 = rc[_R_COS + 1]
    k3 = rc[_R_COS + 2]
    k4 = rc[_R_COS + 3]
    k5 = rc[_R_COS + 4]
    k6 = rc[_R_COS + 5]
    u0 = roots[0, 0]
    for b in range(nB):
        x = u0 * r[b]
        n = np.floor(x * tpi + half)
        y = ((x - n * p1) - n * p2) - n * p3
        z = y * y
        sy = y + y * z * (q1 + z * (q2 + z * (q3 + z * (q4 + z * (q5 + z * q6)))))
        cy = one - half * z + z * z * (k1 + z * (k2 + z * (k3 + z * (k4 + z * (k5 + z * k6)))))
        q = np.int32(n)
        sn = cy if (q & 1) else sy
        cs = sy if (q & 1) else cy
        sn = -sn if (q & 2) else sn
        cs = -cs if ((q + 1) & 2) else cs
        s1[b] = sn
        c1[b] = cs
        sk[b] = sn
        ck[b] = cs
    for k in range(n_max + 2):
        u = roots[0, k]
        if k > 0:
            for b in range(nB):
                sn = sk[b] * c1[b] + ck[b] * s1[b]
                ck[b] = ck[b] * c1[b] - sk[b] * s1[b]
                sk[b] = sn
        for b in range(nB):
            iv = one / (u * r[b])
            j0 = sk[b] * iv
            jv[k, b] = j0
            djv[k, b] = -(j0 - ck[b]) * iv * u


@njit(**_JIT)
def _jrow_generic(l, u, r, rc, jv, djv, k, ja, jb, inv):
    """_jrow for any l (loops over pairs inside the recurrence; slower)."""
    one = rc[_R_ONE]
    nB = r.shape[0]
    for b in range(nB):
        x = u * r[b]
        iv = one / x
        j0 = math.sin(x) * iv
        inv[b] = iv
        ja[b] = j0
        jb[b] = (j0 - math.cos(x)) * iv
    for t in range(1, l):
        a2 = rc[_R_INT + 2 * t + 1]
        for b in range(nB):
            jn = a2 * inv[b] * jb[b] - ja[b]
            ja[b] = jb[b]
            jb[b] = jn
    lp1 = rc[_R_INT + l + 1]
    for b in range(nB):
        jv[k, b] = jb[b]
        djv[k, b] = (ja[b] - lp1 * inv[b] * jb[b]) * u


@njit(**_JIT)
def _radial_block(r, rmin, rc, roots, W, series, nl_index, deriv, ja, jb, inv, g0, jv, djv, g, dg):
    """g[c, b] = g_nl(r_b) and (deriv) dg[c, b] = g_nl'(r_b) for every (n, l) column c.

    Evaluated in float64 (r, jv, djv, ja, jb, inv float64), stored into g, dg of the input dtype."""
    L = roots.shape[0]
    n_max = L - 1
    K = series.shape[2]
    one = rc[_R_ONE]
    nB = r.shape[0]
    for l in range(L):
        nk = n_max - l + 2
        if l == 0:
            _jrow0_all(r, rc, roots, jv, djv, ja, jb, inv, g0)
        for k in range(nk):
            u = roots[l, k]
            if l == 0:
                pass
            elif l == 1:
                _jrow(1, u, r, rc, jv, djv, k)
            elif l == 2:
                _jrow(2, u, r, rc, jv, djv, k)
            elif l == 3:
                _jrow(3, u, r, rc, jv, djv, k)
            elif l == 4:
                _jrow(4, u, r, rc, jv, djv, k)
            elif l == 5:
                _jrow(5, u, r, rc, jv, djv, k)
            elif l == 6:
                _jrow(6, u, r, rc, jv, djv, k)
            elif l == 7:
                _jrow(7, u, r, rc, jv, djv, k)
            else:
                _jrow_generic(l, u, r, rc, jv, djv, k, ja, jb, inv)
        # power series below the threshold; u_{l,k} grows with k, so x is smallest for k = 0
        thr = series[l, 2, 0]
        if rmin * roots[l, 0] < thr:
            for k in range(nk):
                u = roots[l, k]
                for b in range(nB):
                    x = u * r[b]
                    if x < thr:
                        x2 = x * x
                        s = series[l, 0, K - 1]
                        ds = series[l, 1, K - 1]
                        for t in range(K - 2, -1, -1):
                            s = s * x2 + series[l, 0, t]
                            ds = ds * x2 + series[l, 1, t]
                        if l == 0:
                            jv[k, b] = s
                            djv[k, b] = ds * x * u
                        else:
                            xl1 = one
                            for t in range(l - 1):
                                xl1 = xl1 * x
                            jv[k, b] = s * xl1 * x
                            djv[k, b] = ds * xl1 * u
        for n in range(n_max - l + 1):
            c = nl_index[l, n, 0]
            w0 = W[l, n, 0]
            for b in range(nB):
                ja[b] = w0 * jv[0, b]
            for k in range(1, n + 2):
                w = W[l, n, k]
                for b in range(nB):
                    ja[b] += w * jv[k, b]
            for b in range(nB):
                g[c, b] = ja[b]
            if deriv:
                for b in range(nB):
                    ja[b] = w0 * djv[0, b]
                for k in range(1, n + 2):
                    w = W[l, n, k]
                    for b in range(nB):
                        ja[b] += w * djv[k, b]
                for b in range(nB):
                    dg[c, b] = ja[b]


@njit(**_JIT)
def _poly_block(r, rc, consts, poly, nl_index, deriv, rt, tt, qq, rl, sg, sd, g, dg):
    """g[c, b] = g_nl(r_b) and (deriv) dg[c, b] = g_nl'(r_b) from the polynomials of
    _radial_polynomials, in the input dtype (float32).  t and q are formed in float64 from
    r (float64) and rounded once: float32 r^2 would cost r_cut^2 x 6e-8 in q near r_cut.
    (With the rconsts rounded to float32, as JAX without x64 passes them, r_cut^2 is the
    rounded one here and in the validity test alike, so g still vanishes where pairs stop.)"""
    L = nl_index.shape[0]
    n_max = L - 1
    nB = r.shape[0]
    one = rc[_R_ONE]
    rc2 = rc[_R_RCUT2]
    a = (one + one) / rc2
    for b in range(nB):
        rr = r[b]
        s = rr * rr
        rt[b] = rr
        tt[b] = s * a - one
        qq[b] = rc2 - s
        rl[b] = consts[_C_ONE]
    for l in range(L):
        # rl = r^l; sg = r^l q^3; sd = r^(l-1) q^2 (r q^2 for l = 0)
        if l > 0:
            for b in range(nB):
                sd[b] = rl[b] * (qq[b] * qq[b])
                rl[b] = rl[b] * rt[b]
        else:
            for b in range(nB):
                sd[b] = rt[b] * (qq[b] * qq[b])
        for b in range(nB):
            sg[b] = rl[b] * (qq[b] * qq[b] * qq[b])
        for n in range(n_max - l + 1):
            c = nl_index[l, n, 0]
            clenshaw_rows(tt, poly[c, 0], nl_index[l, n, 2], sg, g, c)
            if deriv:
                clenshaw_rows(tt, poly[c, 1], nl_index[l, n, 3], sd, dg, c)


@njit(**_JIT)
def _ylm_block(ux, uy, uz, consts, ylm, deriv, Cm, Sm, qa, qb, dqa, dqb, Y, dY):
    """Y[lm, b] = Y_lm(u_b) (index l*l+l+m) and (deriv) dY[0..2, lm, b] its gradient as a
    polynomial in (x, y, z) (the polynomial of basis.real_spherical_harmonics)."""
    L = ylm.shape[0]
    one = consts[_C_ONE]
    zero = consts[_C_ZERO]
    nB = ux.shape[0]
    for b in range(nB):
        Cm[0, b] = one
        Sm[0, b] = zero
    for m in range(1, L):
        for b in range(nB):
            Cm[m, b] = ux[b] * Cm[m - 1, b] - uy[b] * Sm[m - 1, b]
            Sm[m, b] = ux[b] * Sm[m - 1, b] + uy[b] * Cm[m - 1, b]
    qmm = one
    for m in range(L):
        if m > 0:
            qmm = qmm * consts[_C_ZERO + 2 * m - 1]
        # column m: Q_l^m for l = m .. L-1; (qa, qb) = (Q_{l-1}, Q_l), (dqa, dqb) likewise
        for l in range(m, L):
            nrm = ylm[l, m, 0]
            if l == m:
                for b in range(nB):
                    qb[b] = qmm
                    dqb[b] = zero
            elif l == m + 1:
                c = consts[_C_ZERO + 2 * m + 1] * qmm
                for b in range(nB):
                    qa[b] = qb[b]
                    dqa[b] = dqb[b]
                    qb[b] = c * uz[b]
                    dqb[b] = c
            else:
                a1 = ylm[l, m, 1]
                a2 = ylm[l, m, 2]
                for b in range(nB):
                    qn = a1 * uz[b] * qb[b] - a2 * qa[b]
                    dqn = a1 * (qb[b] + uz[b] * dqb[b]) - a2 * dqa[b]
                    qa[b] = qb[b]
                    dqa[b] = dqb[b]
                    qb[b] = qn
                    dqb[b] = dqn
            i0 = l * l + l
            if m == 0:
                for b in range(nB):
                    Y[i0, b] = nrm * qb[b]
                if deriv:
                    for b in range(nB):
                        dY[0, i0, b] = zero
                        dY[1, i0, b] = zero
                        dY[2, i0, b] = nrm * dqb[b]
            else:
                fm = consts[_C_ZERO + m]
                for b in range(nB):
                    nq = nrm * qb[b]
                    Y[i0 + m, b] = nq * Cm[m, b]
                    Y[i0 - m, b] = nq * Sm[m, b]
                if deriv:
                    for b in range(nB):
                        nq = nrm * qb[b]
                        nqm = nq * fm
                        ndq = nrm * dqb[b]
                        dY[0, i0 + m, b] = nqm * Cm[m - 1, b]
                        dY[1, i0 + m, b] = -nqm * Sm[m - 1, b]
                        dY[2, i0 + m, b] = ndq * Cm[m, b]
                        dY[0, i0 - m, b] = nqm * Sm[m - 1, b]
                        dY[1, i0 - m, b] = nqm * Cm[m - 1, b]
                        dY[2, i0 - m, b] = ndq * Sm[m, b]


@njit(**_JIT)
def _ylm(ux, uy, uz, consts, ylm, deriv, Cm, Sm, qa, qb, dqa, dqb, Y, dY):
    """_ylm_block, through its unrolled twin (ylm_unrolled.py: one vectorised loop over
    the slots, intermediates in registers, bitwise the same) where one exists."""
    L = ylm.shape[0]
    if L == 5:
        ylm_5(ux, uy, uz, consts, ylm, deriv, Y, dY)
    elif L == 4:
        ylm_4(ux, uy, uz, consts, ylm, deriv, Y, dY)
    elif L == 6:
        ylm_6(ux, uy, uz, consts, ylm, deriv, Y, dY)
    elif L == 3:
        ylm_3(ux, uy, uz, consts, ylm, deriv, Y, dY)
    elif L == 2:
        ylm_2(ux, uy, uz, consts, ylm, deriv, Y, dY)
    elif L == 1:
        ylm_1(ux, uy, uz, consts, ylm, deriv, Y, dY)
    else:
        _ylm_block(ux, uy, uz, consts, ylm, deriv, Cm, Sm, qa, qb, dqa, dqb, Y, dY)


@njit(**_JIT)
def _t_and_g_l(nn, l, q0, c0, Ab, g, dg, Y, t, G):
    """One l: G[lm] = sum_n Ab[q] g[c], t += Y[lm] sum_n Ab[q] dg[c] over its nn columns
    c = c0 + n (rows q = q0 + n (2l+1) + m).  ``nn`` is a literal: the sums over n stay in
    registers (this loop is bound by L1 loads; a row-by-row update through memory costs
    twice as much)."""
    nn = literally(nn)
    w = 2 * l + 1
    nB = t.shape[0]
    for m in range(w):
        lm = l * l + m
        for b in range(nB):
            ab = Ab[q0 + m, b]
            ag = ab * g[c0, b]
            ad = ab * dg[c0, b]
            for n in range(1, nn):
                ab = Ab[q0 + n * w + m, b]
                ag += ab * g[c0 + n, b]
                ad += ab * dg[c0 + n, b]
            G[lm, b] = ag
            t[b] += Y[lm, b] * ad


@njit(**_JIT)
def _t_and_g_generic(nn, l, q0, c0, Ab, g, dg, Y, t, G, zero):
    w = 2 * l + 1
    nB = t.shape[0]
    for m in range(w):
        lm = l * l + m
        for b in range(nB):
            G[lm, b] = zero
        for n in range(nn):
            q = q0 + n * w + m
            for b in range(nB):
                ab = Ab[q, b]
                G[lm, b] += ab * g[c0 + n, b]
                t[b] += Y[lm, b] * (ab * dg[c0 + n, b])


@njit(**_JIT)
def _t_and_g(L, Ab, g, dg, Y, zero, t, G):
    """t[b] = sum_nlm dg_nl Ab_nlm Y_lm and G[lm, b] = sum_n Ab_nlm g_nl for every slot."""
    for b in range(t.shape[0]):
        t[b] = zero
    q0 = 0
    c0 = 0
    for l in range(L):
        nn = L - l
        if nn == 1:
            _t_and_g_l(1, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 2:
            _t_and_g_l(2, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 3:
            _t_and_g_l(3, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 4:
            _t_and_g_l(4, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 5:
            _t_and_g_l(5, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 6:
            _t_and_g_l(6, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 7:
            _t_and_g_l(7, l, q0, c0, Ab, g, dg, Y, t, G)
        elif nn == 8:
            _t_and_g_l(8, l, q0, c0, Ab, g, dg, Y, t, G)
        else:
            _t_and_g_generic(nn, l, q0, c0, Ab, g, dg, Y, t, G, zero)
        q0 += nn * (2 * l + 1)
        c0 += nn


@njit(**_JIT)
def _clamp(v, P):
    return min(max(v, 0), P)


@njit(**_JIT)
def _zero_uncovered(offsets, N, P, out):
    """Zero the rows of out (P, 3) that no centre's run covers (all rows if offsets decrease)."""
    monotone = True
    for i in range(N):
        if offsets[i + 1] < offsets[i]:
            monotone = False
    lo = _clamp(offsets[0], P) if monotone else P
    hi = _clamp(offsets[N], P) if monotone else P
    for p in range(P):
        if p < lo or p >= hi:
            out[p, 0] = 0.0
            out[p, 1] = 0.0
            out[p, 2] = 0.0


@njit(**_JIT)
def _chunk_lanes(offsets, c0, c1, P, beg, cnt, order):
    """The chunk's runs (beg[k], cnt[k]: centre c0 + k's pairs, clamped to [0, P], empty
    where offsets decrease) and its lane order: order[pos] = the chunk's centres by
    decreasing count (a counting sort: stable, O(centres + largest count)).  Lanes of a
    group (_G consecutive positions) then have similar counts; a group computes
    max(count) rows of _G slots, so padding costs a few % instead of ~20% unsorted."""
    nc = c1 - c0
    cmax = 0
    for k in range(nc):
        lo = _clamp(offsets[c0 + k], P)
        beg[k] = lo
        cnt[k] = max(_clamp(offsets[c0 + k + 1], P) - lo, 0)
        cmax = max(cmax, cnt[k])
    hist = np.zeros(cmax + 1, np.int64)
    for k in range(nc):
        hist[cmax - cnt[k]] += 1
    acc = 0
    for v in range(cmax + 1):
        h = hist[v]
        hist[v] = acc
        acc += h
    for k in range(nc):
        v = cmax - cnt[k]
        order[hist[v]] = k
        hist[v] += 1


@njit(**_JIT)
def _chunk_groups(order, cnt, nc, gmax):
    """gmax[g] = rows of group g (its largest count); returns the chunk's number of rows."""
    n_rows = 0
    for g in range((nc + _G - 1) // _G):
        m = 0
        for lane in range(min(_G, nc - g * _G)):
            m = max(m, cnt[order[g * _G + lane]])
        gmax[g] = m
        n_rows += m
    return n_rows


@njit(**_JIT)
def _chunk_plan(offsets, c0, N, P):
    """Work item c0 .. c0 + nc - 1 (at most _W centres): (nc, beg, cnt, order, gmax,
    n_blocks): the lanes of _chunk_lanes (but beg[pos], cnt[pos] the run of the centre at
    lane position pos, 0 pairs beyond nc), _chunk_groups and its number of blocks (one plan
    for all three kernels: the residual's layout depends on it)."""
    nc = min(N, c0 + _W) - c0
    beg = np.empty(_W, np.int64)
    cnt = np.empty(_W, np.int64)
    order = np.empty(_W, np.int64)
    _chunk_lanes(offsets, c0, c0 + nc, P, beg, cnt, order)
    gmax = np.empty(_W // _G, np.int64)
    n_blocks = (_chunk_groups(order, cnt, nc, gmax) + _R - 1) // _R
    # by lane position: the gather reads them without the indirection through order
    lbeg = np.zeros(_W, np.int64)
    lcnt = np.zeros(_W, np.int64)
    for pos in range(nc):
        lbeg[pos] = beg[order[pos]]
        lcnt[pos] = cnt[order[pos]]
    return nc, lbeg, lcnt, order, gmax, n_blocks


@njit(**_JIT)
def _gather_rows(displacements, neighbor_species, order, cnt, beg, nc, gmax, g, j,
                 ux, uy, uz, spc, pidx, rowg):
    """The next _R rows of the chunk into the block: row (g, j) holds pair j of the _G
    centres of group g, slot rr * _G + lane; pidx = pair index or -1 (padding), rowg = group
    of each row or -1.  Returns the cursor (g, j) of the row after them."""
    n_groups = (nc + _G - 1) // _G
    for rr in range(_R):
        while g < n_groups and j >= gmax[g]:
            g += 1
            j = 0
        rowg[rr] = g if g < n_groups else -1
        for lane in range(_G):
            b = rr * _G + lane
            pos = g * _G + lane
            p = -1
            if g < n_groups and j < cnt[pos]:
                p = beg[pos] + j
            pidx[b] = p
            if p >= 0:
                spc[b] = neighbor_species[p]
                ux[b] = displacements[p, 0]
                uy[b] = displacements[p, 1]
                uz[b] = displacements[p, 2]
            else:
                spc[b] = -1
                ux[b] = 0.0
                uy[b] = 0.0
                uz[b] = 0.0
        if g < n_groups:
            j += 1
    return g, j


@njit(**_JIT)
def _species_masks(valid, spc, one, zero, M):
    """M[s, b] = 1 where slot b holds a valid pair with neighbour species s, else 0."""
    for s in range(M.shape[0]):
        for b in range(_B):
            M[s, b] = one if (valid[b] and spc[b] == s) else zero


@njit(**_JIT)
def _next_run(M, rowg, rr, Mg):
    """The block's run of rows from rr that belong to one group (rowg[rr] >= 0): returns
    (its first lane o, the row after it, its masks): M itself when the run is the whole
    block, else Mg = M on the run's rows and 0 on the others."""
    g = rowg[rr]
    if rr == 0 and rowg[_R - 1] == g:
        return g * _G, _R, M
    e = rr + 1
    while e < _R and rowg[e] == g:
        e += 1
    zero = M.dtype.type(0.0)
    for s in range(M.shape[0]):
        for b in range(_B):
            Mg[s, b] = M[s, b] if rr * _G <= b < e * _G else zero
    return g * _G, e, Mg


@njit(**_JIT)
def _scatter_products(blocks, ci, cj, M, rowg, Mg, At):
    """At[s, q, g _G + lane] += C[q, b] for the valid slots b = rr _G + lane of species s
    in rows rr of group g, C[q, b] = sum_t P_t[ci[q], b] Q_t[cj[q], b] over the pairs of
    blocks = (P_0, Q_0[, P_1, Q_1]): per (q, s) one masked 16-lane FMA per row
    (simd.lanes_scatter_products; the products are formed in registers, no C block is
    written and read back)."""
    rr = 0
    while rr < _R and rowg[rr] >= 0:  # rows without a group (-1) only end a block
        o, rr, src = _next_run(M, rowg, rr, Mg)
        _lanes_scatter_products(blocks, ci, cj, src, o, At)


@njit(**_JIT)
def _lanes_scatter_products(blocks, ci, cj, M, o, At):
    S = At.shape[0]
    if S <= MAX_SPECIES:
        lanes_scatter_products(At, o, blocks, ci, cj, M, S)
    else:  # more species than the vector code is specialised for
        for s in range(S):
            for q in range(At.shape[1]):
                a = ci[q]
                c = cj[q]
                for rr in range(_R):
                    for lane in range(_G):
                        b = rr * _G + lane
                        v = blocks[0][a, b] * blocks[1][c, b]
                        for t in range(1, len(blocks) // 2):
                            v += blocks[2 * t][a, b] * blocks[2 * t + 1][c, b]
                        At[s, q, o + lane] += v * M[s, b]


@njit(**_JIT)
def _gather_lanes(AbT, M, rowg, Mg, Ab):
    """Ab[q, b] = AbT[s, q, g _G + lane] for the valid slot b = rr _G + lane of species s,
    0 for the others (the transpose of _scatter_products)."""
    rr = 0
    first = True
    while rr < _R and rowg[rr] >= 0:  # rows without a group (-1) only end a block
        o, rr, src = _next_run(M, rowg, rr, Mg)
        _lanes_gather(AbT, src, o, not first, Ab)
        first = False
    if first:
        for q in range(Ab.shape[0]):
            for b in range(_B):
                Ab[q, b] = 0.0


@njit(**_JIT)
def _lanes_gather(AbT, M, o, accumulate, Ab):
    S = AbT.shape[0]
    if S <= MAX_SPECIES:
        lanes_gather(AbT, o, M, Ab, S, accumulate)
    else:
        for q in range(AbT.shape[1]):
            for rr in range(_R):
                for lane in range(_G):
                    b = rr * _G + lane
                    v = Ab[q, b] if accumulate else AbT.dtype.type(0.0)
                    for s in range(S):
                        v += M[s, b] * AbT[s, q, o + lane]
                    Ab[q, b] = v


# ---------------------------------------------------------------------------
# Per-centre contractions (vectorised over the nlm axis)


@njit(**_JIT)
def _nlm_segments(nl_index, n_nl, n_nlm):
    """col[q], lm[q]: nl column and Y_lm row of nlm entry q; start[c], length[c]: the m
    run of nl column c."""
    L = nl_index.shape[0]
    col = np.empty(n_nlm, np.int64)
    lm = np.empty(n_nlm, np.int64)
    start = np.empty(n_nl, np.int64)
    length = np.empty(n_nl, np.int64)
    for l in range(L):
        for n in range(L - l):
            c = nl_index[l, n, 0]
            off = nl_index[l, n, 1]
            start[c] = off
            length[c] = 2 * l + 1
            for q in range(2 * l + 1):
                col[off + q] = c
                lm[off + q] = l * l + q
    return col, lm, start, length


@njit(**_JIT)
def _species_pairs(pair_index):
    """ia[pb], ib[pb]: the species pair (a <= b) of feature block pb."""
    S = pair_index.shape[0]
    n = S * (S + 1) // 2
    ia = np.zeros(n, np.int64)
    ib = np.zeros(n, np.int64)
    for a in range(S):
        for bb in range(a, S):
            pb = pair_index[a, bb]
            if 0 <= pb < n:
                ia[pb] = a
                ib[pb] = bb
    return ia, ib


# Per-chunk contractions on centre-minor ("transposed") arrays At[a, q, k] = A[c0 + order[k], a, q]
# (k < nc; the chunk's lanes): the loops over the chunk's centres k are innermost and
# contiguous, so they vectorise (the m runs of the nlm axis are too short for that).


@njit(**_JIT)
def _copy(src, dst):
    """dst[:] = src[:] (1-d, same length).  The plain loop: LLVM vectorises it fully
    (3x faster here than numba's slice assignment)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@njit(**_JIT)
def _zero(a):
    """a[...] = 0 for a C-contiguous array, as one flat loop (numba's a[...] = 0 on a 3-d
    array is an indexed scalar loop: ~10% of a work item for the 56 kB At)."""
    f = a.reshape(a.size)
    zero = a.dtype.type(0.0)
    for i in range(f.shape[0]):
        f[i] = zero


@njit(**_JIT)
def _residual_out(At, c0, nc, A):
    """The work item's At (lanes k < nc) into its stretch of the residual, lane-major:
    flat A[c0 S n_nlm + (s n_nlm + q) nc + k] = At[s, q, k] (see "Residual")."""
    S = At.shape[0]
    n_nlm = At.shape[1]
    Af = A.reshape(A.size)
    base = c0 * S * n_nlm
    if nc == _W:  # the stretch is At itself, flat: one copy (the loops below stay scalar)
        _copy(At.reshape(At.size), Af[base:base + At.size])
        return
    for s in range(S):
        for q in range(n_nlm):
            o = base + (s * n_nlm + q) * nc
            for k in range(nc):
                Af[o + k] = At[s, q, k]


@njit(**_JIT)
def _residual_in(A, c0, nc, At):
    """The inverse of _residual_out (lanes k >= nc of At are left as they are)."""
    S = At.shape[0]
    n_nlm = At.shape[1]
    Af = A.reshape(A.size)
    base = c0 * S * n_nlm
    if nc == _W:
        _copy(Af[base:base + At.size], At.reshape(At.size))
        return
    for s in range(S):
        for q in range(n_nlm):
            o = base + (s * n_nlm + q) * nc
            for k in range(nc):
                At[s, q, k] = Af[o + k]


@njit(**_JIT)
def _rows_to_lanes(X, order, c0, nc, Xt):
    """Xt[f, k] = X[c0 + order[k], f] for the work item's lanes k < nc, 0 above."""
    rows_to_lanes(X, order, c0, nc, Xt)  # 16 x 16 tiles through registers
    F = X.shape[1]
    for f in range(F - F % _G, F):
        for k in range(nc, _W):
            Xt[f, k] = 0.0
        for k in range(nc):
            Xt[f, k] = X[c0 + order[k], f]


@njit(**_JIT)
def _lanes_to_rows(Xt, order, c0, nc, X):
    """X[c0 + order[k], f] = Xt[f, k] for the work item's lanes k < nc."""
    lanes_to_rows(Xt, order, c0, nc, X)
    F = X.shape[1]
    for f in range(F - F % _G, F):
        for k in range(nc):
            X[c0 + order[k], f] = Xt[f, k]


@njit(**_JIT)
def _abar_lanes(At, Xbt, pair_index, ia, ib, n_nl, col, two, AbT):
    """AbT[a, q, k] = sum_b w_ab Xbar^{(ab)}_{col(q)} A^b_q (w = 2 for a = b:
    X^{aa} = sum A^a A^a), vectorised over the 64 lanes."""
    S = At.shape[0]
    if S <= MAX_SPECIES:
        lanes_abar(AbT, At, Xbt, pair_index, col, S)
        return
    # more species than the vector code is specialised for
    n_nlm = At.shape[1]
    for a in range(At.shape[0]):
        for q in range(n_nlm):
            for k in range(_W):
                AbT[a, q, k] = 0.0
    for pb in range(ia.shape[0]):
        a = ia[pb]
        b = ib[pb]
        for q in range(n_nlm):
            f = pb * n_nl + col[q]
            if a == b:
                for k in range(_W):
                    AbT[a, q, k] += two * Xbt[f, k] * At[a, q, k]
            else:
                for k in range(_W):
                    x = Xbt[f, k]
                    AbT[a, q, k] += x * At[b, q, k]
                    AbT[b, q, k] += x * At[a, q, k]


def density_from_residual(A, offsets, n_pairs):
    """The density coefficients (N, S, n_nlm), per centre, from the forward kernel's
    residual A (same shape, lane-major per work item; see "Residual") of a call with
    these offsets and ``n_pairs`` pairs."""
    A = np.ascontiguousarray(A)
    out = np.empty_like(A)
    _unpermute(A, np.asarray(offsets), n_pairs, out)
    return out


@njit(**_JIT)
def _unpermute(A, offsets, P, out):
    N, S, n_nlm = A.shape
    Af = A.reshape(A.size)
    beg = np.empty(_W, np.int64)
    cnt = np.empty(_W, np.int64)
    order = np.empty(_W, np.int64)
    for c0 in range(0, N, _W):
        nc = min(N, c0 + _W) - c0
        _chunk_lanes(offsets, c0, c0 + nc, P, beg, cnt, order)
        base = c0 * S * n_nlm
        for s in range(S):
            for q in range(n_nlm):
                for k in range(nc):
                    out[c0 + order[k], s, q] = Af[base + (s * n_nlm + q) * nc + k]


@njit(**_JIT)
def _power_spectrum_t(arrays, pair_index, ia, ib, n_nl, start, length, Xt):
    """Xt[(ab) block, k] = sum_m A^a_{nlm} A^b_{nlm} (arrays = (At,)) or
    sum_m (Adot^a A^b + A^a Adot^b) (arrays = (At, Adt)) for the 64 lanes k."""
    S = arrays[0].shape[0]
    if S <= MAX_SPECIES:
        lanes_power_spectrum(Xt, arrays, pair_index, start, length, S)
    else:  # more species than the vector code is specialised for
        At = arrays[0]
        Adt = arrays[len(arrays) - 1]
        dot = len(arrays) == 2
        for pb in range(ia.shape[0]):
            a = ia[pb]
            b = ib[pb]
            for c in range(n_nl):
                f = pb * n_nl + c
                for k in range(_W):
                    Xt[f, k] = 0.0
                for q in range(start[c], start[c] + length[c]):
                    for k in range(_W):
                        if dot:
                            Xt[f, k] += Adt[a, q, k] * At[b, q, k] + At[a, q, k] * Adt[b, q, k]
                        else:
                            Xt[f, k] += At[a, q, k] * At[b, q, k]


# ---------------------------------------------------------------------------
# Kernels


@njit(parallel=True, **_JIT)
def descriptors_fwd(displacements, offsets, neighbor_species,
                    consts, rconsts, roots, W, series, ylm, nl_index, pair_index, poly,
                    X, A):
    N = X.shape[0]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    f8 = np.float64
    zero = consts[_C_ZERO]
    one = consts[_C_ONE]
    col, lm, start, length = _nlm_segments(nl_index, n_nl, n_nlm)
    ia, ib = _species_pairs(pair_index)
    use_poly = poly.shape[0] == n_nl
    n_chunks = (N + _W - 1) // _W
    n_w = max(1, min(n_chunks, num_threads()))  # one worker per thread
    counter = np.full(1, n_w, np.int64)  # the next unclaimed work item (parallel.claim)
    for w in prange(n_w):
        r = np.empty(_B, f8)
        ux = np.empty(_B, f8)
        uy = np.empty(_B, f8)
        uz = np.empty(_B, f8)
        ir = np.empty(_B, f8)
        valid = np.empty(_B, np.bool_)
        spc = np.empty(_B, np.int32)
        pidx = np.empty(_B, np.int64)
        rowg = np.empty(_R, np.int64)
        ja = np.empty(_B, f8)
        jb = np.empty(_B, f8)
        inv = np.empty(_B, f8)
        g0 = np.empty(_B, f8)
        rt = np.empty(_B, dt)
        tt = np.empty(_B, dt)
        qq = np.empty(_B, dt)
        rl = np.empty(_B, dt)
        sg = np.empty(_B, dt)
        sd = np.empty(_B, dt)
        jv = np.empty((L + 1, _B), f8)
        djv = np.empty((L + 1, _B), f8)
        g = np.empty((n_nl, _B), dt)
        vx = np.empty(_B, dt)
        vy = np.empty(_B, dt)
        vz = np.empty(_B, dt)
        irt = np.empty(_B, dt)
        Cm = np.empty((L, _B), dt)
        Sm = np.empty((L, _B), dt)
        qa = np.empty(_B, dt)
        qb = np.empty(_B, dt)
        dqa = np.empty(_B, dt)
        dqb = np.empty(_B, dt)
        Y = np.empty((L * L, _B), dt)
        dY = np.empty((3, 1, _B), dt)  # unused (no derivatives in the forward pass)
        M = np.empty((S, _B), dt)
        Mg = np.empty((S, _B), dt)
        Xt = np.empty((X.shape[1], _W), dt)  # the work item's X, lane-major
        At = np.empty((S, n_nlm, _W), dt)  # A of the chunk's lanes, centre-minor
        ch = np.int64(w)  # each worker's first item is its own, the rest go to whoever is free
        while ch < n_chunks:
            c0 = ch * _W
            nc, beg, cnt, order, gmax, n_blocks = _chunk_plan(offsets, c0, N, P)
            _zero(At)
            gc = 0
            jc = 0
            for _ in range(n_blocks):
                gc, jc = _gather_rows(displacements, neighbor_species, order, cnt, beg, nc, gmax,
                                      gc, jc, ux, uy, uz, spc, pidx, rowg)
                rmin = _geometry(rconsts, S, r, ux, uy, uz, ir, vx, vy, vz, irt, valid, spc)
                if use_poly:
                    _poly_block(r, rconsts, consts, poly, nl_index, False, rt, tt, qq, rl, sg, sd,
                                g, g)
                else:
                    _radial_block(r, rmin, rconsts, roots, W, series, nl_index, False,
                                  ja, jb, inv, g0, jv, djv, g, g)
                _ylm(vx, vy, vz, consts, ylm, False, Cm, Sm, qa, qb, dqa, dqb, Y, dY)
                # contributions g_nl Y_lm, added lane-wise
                _species_masks(valid, spc, one, zero, M)
                _scatter_products((g, Y), col, lm, M, rowg, Mg, At)
            _power_spectrum_t((At,), pair_index, ia, ib, n_nl, start, length, Xt)
            _lanes_to_rows(Xt, order, c0, nc, X)
            _residual_out(At, c0, nc, A)
            ch = claim(counter)


@njit(parallel=True, **_JIT)
def descriptors_vjp(displacements, offsets, neighbor_species,
                    consts, rconsts, roots, W, series, ylm, nl_index, pair_index, poly,
                    A, X_bar, d_bar):
    C = X_bar.shape[0]
    N = X_bar.shape[1]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    f8 = np.float64
    zero = consts[_C_ZERO]
    one = consts[_C_ONE]
    two = consts[_C_TWO]
    for kc in range(C):
        _zero_uncovered(offsets, N, P, d_bar[kc])
    col, lm, start, length = _nlm_segments(nl_index, n_nl, n_nlm)
    ia, ib = _species_pairs(pair_index)
    use_poly = poly.shape[0] == n_nl
    n_chunks = (N + _W - 1) // _W
    n_w = max(1, min(n_chunks, num_threads()))  # one worker per thread
    counter = np.full(1, n_w, np.int64)  # the next unclaimed work item (parallel.claim)
    for w in prange(n_w):
        r = np.empty(_B, f8)
        ux = np.empty(_B, f8)
        uy = np.empty(_B, f8)
        uz = np.empty(_B, f8)
        ir = np.empty(_B, f8)
        valid = np.empty(_B, np.bool_)
        spc = np.empty(_B, np.int32)
        pidx = np.empty(_B, np.int64)
        rowg = np.empty(_R, np.int64)
        ja = np.empty(_B, f8)
        jb = np.empty(_B, f8)
        inv = np.empty(_B, f8)
        g0 = np.empty(_B, f8)
        rt = np.empty(_B, dt)
        tt = np.empty(_B, dt)
        qq = np.empty(_B, dt)
        rl = np.empty(_B, dt)
        sg = np.empty(_B, dt)
        sd = np.empty(_B, dt)
        jv = np.empty((L + 1, _B), f8)
        djv = np.empty((L + 1, _B), f8)
        g = np.empty((n_nl, _B), dt)
        dg = np.empty((n_nl, _B), dt)
        wx = np.empty(_B, dt)
        wy = np.empty(_B, dt)
        wz = np.empty(_B, dt)
        irt = np.empty(_B, dt)
        vx = np.empty(_B, dt)
        vy = np.empty(_B, dt)
        vz = np.empty(_B, dt)
        Cm = np.empty((L, _B), dt)
        Sm = np.empty((L, _B), dt)
        qa = np.empty(_B, dt)
        qb = np.empty(_B, dt)
        dqa = np.empty(_B, dt)
        dqb = np.empty(_B, dt)
        Y = np.empty((L * L, _B), dt)
        dY = np.empty((3, L * L, _B), dt)
        Ab = np.empty((n_nlm, _B), dt)
        G = np.empty((L * L, _B), dt)
        t = np.empty(_B, dt)
        M = np.empty((S, _B), dt)
        Mg = np.empty((S, _B), dt)
        At = np.empty((S, n_nlm, _W), dt)
        Xbt = np.empty((X_bar.shape[2], _W), dt)
        AbT = np.empty((C, S, n_nlm, _W), dt)  # A_bar of the chunk's lanes, centre-minor
        ch = np.int64(w)  # each worker's first item is its own, the rest go to whoever is free
        while ch < n_chunks:
            c0 = ch * _W
            nc, beg, cnt, order, gmax, n_blocks = _chunk_plan(offsets, c0, N, P)
            _zero(At)
            _residual_in(A, c0, nc, At)
            for kc in range(C):
                _rows_to_lanes(X_bar[kc], order, c0, nc, Xbt)
                _abar_lanes(At, Xbt, pair_index, ia, ib, n_nl, col, two, AbT[kc])
            gc = 0
            jc = 0
            for _ in range(n_blocks):
                gc, jc = _gather_rows(displacements, neighbor_species, order, cnt, beg, nc, gmax,
                                      gc, jc, ux, uy, uz, spc, pidx, rowg)
                rmin = _geometry(rconsts, S, r, ux, uy, uz, ir, wx, wy, wz, irt, valid, spc)
                if use_poly:
                    _poly_block(r, rconsts, consts, poly, nl_index, True, rt, tt, qq, rl, sg, sd,
                                g, dg)
                else:
                    _radial_block(r, rmin, rconsts, roots, W, series, nl_index, True,
                                  ja, jb, inv, g0, jv, djv, g, dg)
                _ylm(wx, wy, wz, consts, ylm, True, Cm, Sm, qa, qb, dqa, dqb, Y, dY)
                # each slot's A_bar row (its centre's lane, its species); zero for invalid slots
                _species_masks(valid, spc, one, zero, M)
                for kc in range(C):  # the cotangents share the geometry above
                    _gather_lanes(AbT[kc], M, rowg, Mg, Ab)
                    # t = sum_nlm dg_nl A_bar Y_lm;  G_lm = sum_n A_bar g_nl (vectorised over pairs)
                    _t_and_g(L, Ab, g, dg, Y, zero, t, G)
                    # v = sum_lm G_lm grad Y_lm;  d_bar = u t + (v - u (u . v)) / r
                    for b in range(_B):
                        vx[b] = zero
                        vy[b] = zero
                        vz[b] = zero
                    for q in range(L * L):
                        for b in range(_B):
                            gq = G[q, b]
                            vx[b] += gq * dY[0, q, b]
                            vy[b] += gq * dY[1, q, b]
                            vz[b] += gq * dY[2, q, b]
                    for b in range(_B):
                        x = wx[b]
                        y = wy[b]
                        z = wz[b]
                        uv = x * vx[b] + y * vy[b] + z * vz[b]
                        i_r = irt[b]
                        tb = t[b]
                        vx[b] = x * tb + (vx[b] - x * uv) * i_r
                        vy[b] = y * tb + (vy[b] - y * uv) * i_r
                        vz[b] = z * tb + (vz[b] - z * uv) * i_r
                    for b in range(_B):
                        p = pidx[b]
                        if p < 0:
                            continue
                        if valid[b]:
                            d_bar[kc, p, 0] = vx[b]
                            d_bar[kc, p, 1] = vy[b]
                            d_bar[kc, p, 2] = vz[b]
                        else:
                            d_bar[kc, p, 0] = zero
                            d_bar[kc, p, 1] = zero
                            d_bar[kc, p, 2] = zero
            ch = claim(counter)


@njit(parallel=True, **_JIT)
def descriptors_jvp(displacements, offsets, neighbor_species,
                    consts, rconsts, roots, W, series, ylm, nl_index, pair_index, poly,
                    A, d_dot, X_dot):
    C = X_dot.shape[0]
    N = X_dot.shape[1]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    f8 = np.float64
    zero = consts[_C_ZERO]
    one = consts[_C_ONE]
    col, lm, start, length = _nlm_segments(nl_index, n_nl, n_nlm)
    ia, ib = _species_pairs(pair_index)
    use_poly = poly.shape[0] == n_nl
    n_chunks = (N + _W - 1) // _W
    n_w = max(1, min(n_chunks, num_threads()))  # one worker per thread
    counter = np.full(1, n_w, np.int64)  # the next unclaimed work item (parallel.claim)
    for w in prange(n_w):
        r = np.empty(_B, f8)
        ux = np.empty(_B, f8)
        uy = np.empty(_B, f8)
        uz = np.empty(_B, f8)
        ir = np.empty(_B, f8)
        valid = np.empty(_B, np.bool_)
        spc = np.empty(_B, np.int32)
        pidx = np.empty(_B, np.int64)
        rowg = np.empty(_R, np.int64)
        ja = np.empty(_B, f8)
        jb = np.empty(_B, f8)
        inv = np.empty(_B, f8)
        g0 = np.empty(_B, f8)
        rt = np.empty(_B, dt)
        tt = np.empty(_B, dt)
        qq = np.empty(_B, dt)
        rl = np.empty(_B, dt)
        sg = np.empty(_B, dt)
        sd = np.empty(_B, dt)
        jv = np.empty((L + 1, _B), f8)
        djv = np.empty((L + 1, _B), f8)
        g = np.empty((n_nl, _B), dt)
        dg = np.empty((n_nl, _B), dt)
        wx = np.empty(_B, dt)
        wy = np.empty(_B, dt)
        wz = np.empty(_B, dt)
        irt = np.empty(_B, dt)
        ex = np.empty(_B, dt)
        ey = np.empty(_B, dt)
        ez = np.empty(_B, dt)
        Cm = np.empty((L, _B), dt)
        Sm = np.empty((L, _B), dt)
        qa = np.empty(_B, dt)
        qb = np.empty(_B, dt)
        dqa = np.empty(_B, dt)
        dqb = np.empty(_B, dt)
        Y = np.empty((L * L, _B), dt)
        dY = np.empty((3, L * L, _B), dt)
        Yt = np.empty((L * L, _B), dt)
        M = np.empty((S, _B), dt)
        Mg = np.empty((S, _B), dt)
        rho = np.empty(_B, dt)
        Xt = np.empty((X_dot.shape[2], _W), dt)  # the work item's X_dot, lane-major
        At = np.empty((S, n_nlm, _W), dt)
        Adt = np.empty((C, S, n_nlm, _W), dt)  # A_dot of the chunk's lanes, centre-minor
        dgr = np.empty((n_nl, _B), dt)
        ch = np.int64(w)  # each worker's first item is its own, the rest go to whoever is free
        while ch < n_chunks:
            c0 = ch * _W
            nc, beg, cnt, order, gmax, n_blocks = _chunk_plan(offsets, c0, N, P)
            _zero(At)
            _zero(Adt)
            _residual_in(A, c0, nc, At)
            gc = 0
            jc = 0
            for _ in range(n_blocks):
                gc, jc = _gather_rows(displacements, neighbor_species, order, cnt, beg, nc, gmax,
                                      gc, jc, ux, uy, uz, spc, pidx, rowg)
                rmin = _geometry(rconsts, S, r, ux, uy, uz, ir, wx, wy, wz, irt, valid, spc)
                if use_poly:
                    _poly_block(r, rconsts, consts, poly, nl_index, True, rt, tt, qq, rl, sg, sd,
                                g, dg)
                else:
                    _radial_block(r, rmin, rconsts, roots, W, series, nl_index, True,
                                  ja, jb, inv, g0, jv, djv, g, dg)
                _ylm(wx, wy, wz, consts, ylm, True, Cm, Sm, qa, qb, dqa, dqb, Y, dY)
                _species_masks(valid, spc, one, zero, M)
                for kc in range(C):  # the tangents share the geometry above
                    # tangents of invalid slots are never read (a non-finite one must not
                    # reach A_dot)
                    for b in range(_B):
                        p = pidx[b]
                        if p >= 0 and valid[b]:
                            ex[b] = d_dot[kc, p, 0]
                            ey[b] = d_dot[kc, p, 1]
                            ez[b] = d_dot[kc, p, 2]
                        else:
                            ex[b] = zero
                            ey[b] = zero
                            ez[b] = zero
                    # rho = u . d_dot;  tangent = (d_dot - u rho) / r  (overwrites e)
                    for b in range(_B):
                        x = wx[b]
                        y = wy[b]
                        z = wz[b]
                        rh = x * ex[b] + y * ey[b] + z * ez[b]
                        i_r = irt[b]
                        rho[b] = rh
                        ex[b] = (ex[b] - x * rh) * i_r
                        ey[b] = (ey[b] - y * rh) * i_r
                        ez[b] = (ez[b] - z * rh) * i_r
                    for q in range(L * L):
                        for b in range(_B):
                            Yt[q, b] = (dY[0, q, b] * ex[b] + dY[1, q, b] * ey[b]
                                        + dY[2, q, b] * ez[b])
                    for c in range(n_nl):
                        for b in range(_B):
                            dgr[c, b] = dg[c, b] * rho[b]
                    # contributions dg_nl rho Y_lm + g_nl Y_t,lm, added lane-wise
                    _scatter_products((dgr, Y, g, Yt), col, lm, M, rowg, Mg, Adt[kc])
            for kc in range(C):
                _power_spectrum_t((At, Adt[kc]), pair_index, ia, ib, n_nl, start, length, Xt)
                _lanes_to_rows(Xt, order, c0, nc, X_dot[kc])
            ch = claim(counter)


# ---------------------------------------------------------------------------
# Convenience wrappers on numpy arrays (tests, benchmarks)


def flop_counts_of(tables) -> dict:
    """:func:`flop_counts` of the radial path the kernels take with these tables (the
    polynomial path when table 8 holds every (n, l) column, as the kernels decide)."""
    L = tables[2].shape[0]
    n_nl = L * (L + 1) // 2
    degrees = tables[6][..., 2:] if tables[8].shape[0] == n_nl else None
    return flop_counts(L - 1, tables[7].shape[0], degrees)


def n_features_of(tables) -> int:
    L = tables[2].shape[0]
    S = tables[7].shape[0]
    return S * (S + 1) // 2 * L * (L + 1) // 2


def forward(displacements, offsets, neighbor_species, tables):
    """(X (N, n_features), A (N, S, n_nlm)) on numpy arrays."""
    N = len(offsets) - 1
    L = tables[2].shape[0]
    S = tables[7].shape[0]
    dt = displacements.dtype
    X = np.empty((N, n_features_of(tables)), dt)
    A = np.empty((N, S, n_nlm_of(L - 1)), dt)
    descriptors_fwd(displacements, offsets, neighbor_species, *tables, X, A)
    return X, A


def vjp(displacements, offsets, neighbor_species, tables, A, X_bar):
    """d_bar (P, 3) on numpy arrays; X_bar (N, F), or (C, N, F) for d_bar (C, P, 3)."""
    Xb = X_bar if X_bar.ndim == 3 else X_bar[None]
    d_bar = np.empty((Xb.shape[0],) + displacements.shape, displacements.dtype)
    descriptors_vjp(displacements, offsets, neighbor_species, *tables, A,
                    np.ascontiguousarray(Xb), d_bar)
    return d_bar if X_bar.ndim == 3 else d_bar[0]


def jvp(displacements, offsets, neighbor_species, tables, A, d_dot):
    """X_dot (N, n_features) on numpy arrays; d_dot (P, 3), or (C, P, 3) for X_dot (C, N, F)."""
    dd = d_dot if d_dot.ndim == 3 else d_dot[None]
    N = len(offsets) - 1
    X_dot = np.empty((dd.shape[0], N, n_features_of(tables)), displacements.dtype)
    descriptors_jvp(displacements, offsets, neighbor_species, *tables, A,
                    np.ascontiguousarray(dd), X_dot)
    return X_dot if d_dot.ndim == 3 else X_dot[0]
