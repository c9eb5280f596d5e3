"""Numba CPU kernels: spherical Bessel descriptors and their derivatives.

Pure numba/numpy (no JAX here).  Every kernel has the XLA-FFI calling
convention of :mod:`neuralil_fast.kernels.ffi`: ``impl(*inputs, *outputs)``,
writes every element of every output, never writes its inputs.

Inputs shared by all kernels (the pair layout of ``neuralil_fast.neighbors``):

    displacements    (P, 3) float   x_j + S @ cell - x_i
    offsets          (N+1,) int32   CSR start of each centre's run of pairs
                                    (offsets[i] .. offsets[i+1]-1 belong to centre i)
    neighbor_species (P,) int32     species index of j, 0..S-1

followed by the tables of :func:`make_tables` (``*tables``, see there), then
the kernel's own inputs, then its outputs:

    descriptors_fwd(displacements, offsets, neighbor_species, *tables,
                    X, A)
        X (N, n_features): the power spectrum p^{ab}_{nl} (a <= b pair-major, nl-minor)
        A (N, S, n_nlm):   the density coefficients A^a_{nlm}, nlm in the order of
                           DescriptorSpec.nlm_tables() (l-major (n,l), then m = -l..l).
    descriptors_vjp(displacements, offsets, neighbor_species, *tables, A, X_bar,
                    d_bar)
        d_bar (P, 3) = d/d(displacements) of sum(X_bar * X); zero on rows that are
        outside every centre's run, on padding and on pairs with r == 0 or r >= r_cut.
    descriptors_jvp(displacements, offsets, neighbor_species, *tables, A, d_dot,
                    X_dot)
        X_dot (N, n_features) = dX/d(displacements) . d_dot (also the transpose of the vjp
        in X_bar: used for double backward).

Residual: A (N, S, n_nlm), written by the forward pass and read by both derivative
kernels.  It is O(N) memory (55 numbers per species per atom for n_max = 4).  The
per-pair derivative tensor dA/dd would be O(P * n_nlm * 3) (about 50x larger); it is
recomputed from the displacements in the vjp/jvp instead (the per-pair radial and
angular functions are cheap relative to memory traffic).

A pair contributes only when 0 < r < r_cut (r^2 tested in the input dtype); other
pairs and species outside 0..S-1 are ignored (zero contribution, zero gradient).
Offsets are clamped to [0, P], so garbage offsets cannot index out of bounds.
Arithmetic is in the input dtype (float32 or float64; numba compiles one version
per dtype, and the tables must have the same float dtype as the displacements).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

__all__ = ["make_tables", "descriptors_fwd", "descriptors_vjp", "descriptors_jvp",
           "n_nlm_of", "offsets_from_centers", "forward", "vjp", "jvp"]

_JIT = dict(cache=False, boundscheck=False, error_model="numpy", fastmath=False)


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
    """The constant tables the kernels need, in the order the kernels take them:

    0 rcut2      (1,) float         r_cut^2
    1 roots      (L, n_max+2) float u_{l,k} / r_cut (row l valid for k <= n_max-l+1), L = n_max+1
    2 W          (L, n_max+1, n_max+2) float  g_{nl}(r) = sum_k W[l,n,k] j_l(roots[l,k] r):
                                    T_l @ [c1 on the diagonal, -c2 on the superdiagonal] / r_cut^1.5
                                    (nonzero for k <= n+1)
    3 series     (L, K) float       j_l(x) = x^l sum_k series[l,k] x^(2k) (below thresh[l])
    4 dseries    (L, K) float       j_l'(x) = x^(l-1) sum_k dseries[l,k] x^(2k) (l >= 1),
                                    j_0'(x) = x sum_k dseries[0,k] x^(2k)
    5 thresh     (L,) float         series below, upward recurrence from sin/cos above
                                    (the reference's thresholds)
    6 ynorm      (L, L) float       Y_lm normalisation (times sqrt 2 for m > 0)
    7 nl_index   (L, n_max+1, 2) int32  [column of (n,l) in the nl axis, start of its m run in nlm]
    8 pair_index (S, S) int32       species block of (min(a,b), max(a,b)) in the feature vector

    Float tables are computed in float64 from ``neuralil_fast.basis.radial_basis`` and
    cast to ``dtype`` (which must be the displacements' dtype).
    """
    from neuralil_fast.basis import _series_threshold, radial_basis

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    basis = radial_basis(int(n_max), float(r_cut))
    n_max = basis.n_max
    rc = basis.r_cut
    L = n_max + 1
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
    series = np.zeros((L, K))
    dseries = np.zeros((L, K))
    for l in range(L):
        coef = np.zeros(K + 1)
        coef[0] = 1.0 / math.prod(range(1, 2 * l + 2, 2))
        for k in range(1, K + 1):
            coef[k] = -coef[k - 1] / (2.0 * k * (2 * l + 2 * k + 1))
        series[l] = coef[:K]
        if l == 0:
            dseries[l] = coef[1: K + 1] * 2.0 * np.arange(1, K + 1)
        else:
            dseries[l] = coef[:K] * (l + 2.0 * np.arange(K))
    ynorm = np.zeros((L, L))
    for l in range(L):
        for m in range(l + 1):
            v = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
            ynorm[l, m] = v * (math.sqrt(2.0) if m > 0 else 1.0)
    nl_index = np.zeros((L, n_max + 1, 2), np.int32)
    c = 0
    off = 0
    for l in range(L):
        for n in range(n_max - l + 1):
            nl_index[l, n] = (c, off)
            c += 1
            off += 2 * l + 1
    pair_index = np.zeros((n_species, n_species), np.int32)
    q = 0
    for a in range(n_species):
        for b in range(a, n_species):
            pair_index[a, b] = pair_index[b, a] = q
            q += 1
    f = lambda x: np.ascontiguousarray(x, dtype=dtype)
    return (f([rc * rc]), f(roots), f(W), f(series), f(dseries), f(thresh), f(ynorm),
            nl_index, pair_index)


def offsets_from_centers(centers, n_atoms: int) -> np.ndarray:
    """(N+1,) int32 CSR offsets of centre-sorted ``centers`` (padding = n_atoms falls after)."""
    return np.searchsorted(np.asarray(centers), np.arange(n_atoms + 1), side="left").astype(np.int32)


# ---------------------------------------------------------------------------
# Per-pair functions


@njit(inline="always", **_JIT)
def _radial(r, roots, W, series, dseries, thresh, nl_index, jv, djv, g, dg):
    """g[c] = g_nl(r), dg[c] = d g_nl / dr for every (n, l) column c."""
    L = roots.shape[0]
    n_max = L - 1
    K = series.shape[1]
    for l in range(L):
        for k in range(n_max - l + 2):
            u = roots[l, k]
            x = u * r
            if x < thresh[l]:
                x2 = x * x
                s = series[l, K - 1]
                ds = dseries[l, K - 1]
                for q in range(K - 2, -1, -1):
                    s = s * x2 + series[l, q]
                    ds = ds * x2 + dseries[l, q]
                if l == 0:
                    jl = s
                    djl = ds * x
                else:
                    xp = x  # x^(l-1) * x
                    xl1 = x - x + 1.0
                    for q in range(l - 1):
                        xl1 = xl1 * x
                    jl = s * xl1 * xp
                    djl = ds * xl1
            else:
                sn = math.sin(x)
                cs = math.cos(x)
                inv = 1.0 / x
                j0 = sn * inv
                j1 = (j0 - cs) * inv
                if l == 0:
                    jl = j0
                    djl = -j1
                else:
                    jm = j0
                    jc = j1
                    for q in range(1, l):
                        jn = (2 * q + 1) * inv * jc - jm
                        jm = jc
                        jc = jn
                    jl = jc
                    djl = jm - (l + 1) * inv * jc
            jv[k] = jl
            djv[k] = djl * u
        for n in range(n_max - l + 1):
            acc = W[l, n, 0] * jv[0]
            dacc = W[l, n, 0] * djv[0]
            for k in range(1, n + 2):
                acc += W[l, n, k] * jv[k]
                dacc += W[l, n, k] * djv[k]
            c = nl_index[l, n, 0]
            g[c] = acc
            dg[c] = dacc


@njit(inline="always", **_JIT)
def _ylm(x, y, z, ynorm, Cm, Sm, Q, dQ, Y, dY):
    """Real Y_lm(x, y, z) (index l*l+l+m) and its gradient dY[lm, :] as a polynomial in (x, y, z).

    Same polynomial as ``neuralil_fast.basis.real_spherical_harmonics``:
    Y_l0 = N Q_l^0(z), Y_{l,+m} = sqrt2 N Q_l^m(z) Re (x+iy)^m, Y_{l,-m} = sqrt2 N Q_l^m(z) Im (x+iy)^m.
    """
    L = ynorm.shape[0]
    one = x - x + 1.0
    Cm[0] = one
    Sm[0] = one - one
    for m in range(1, L):
        Cm[m] = x * Cm[m - 1] - y * Sm[m - 1]
        Sm[m] = x * Sm[m - 1] + y * Cm[m - 1]
    qmm = one
    for m in range(L):
        if m > 0:
            qmm = qmm * (2 * m - 1)
        Q[m, m] = qmm
        dQ[m, m] = one - one
        if m + 1 < L:
            Q[m + 1, m] = (2 * m + 1) * z * qmm
            dQ[m + 1, m] = (2 * m + 1) * qmm
        for l in range(m + 2, L):
            inv = one / (l - m)
            Q[l, m] = ((2 * l - 1) * z * Q[l - 1, m] - (l + m - 1) * Q[l - 2, m]) * inv
            dQ[l, m] = ((2 * l - 1) * (Q[l - 1, m] + z * dQ[l - 1, m]) - (l + m - 1) * dQ[l - 2, m]) * inv
    for l in range(L):
        i0 = l * l + l
        nq = ynorm[l, 0] * Q[l, 0]
        Y[i0] = nq
        dY[i0, 0] = one - one
        dY[i0, 1] = one - one
        dY[i0, 2] = ynorm[l, 0] * dQ[l, 0]
        for m in range(1, l + 1):
            nq = ynorm[l, m] * Q[l, m]
            ndq = ynorm[l, m] * dQ[l, m]
            Y[i0 + m] = nq * Cm[m]
            Y[i0 - m] = nq * Sm[m]
            dY[i0 + m, 0] = nq * m * Cm[m - 1]
            dY[i0 + m, 1] = -nq * m * Sm[m - 1]
            dY[i0 + m, 2] = ndq * Cm[m]
            dY[i0 - m, 0] = nq * m * Sm[m - 1]
            dY[i0 - m, 1] = nq * m * Cm[m - 1]
            dY[i0 - m, 2] = ndq * Sm[m]


# ---------------------------------------------------------------------------
# Kernels


@njit(parallel=True, **_JIT)
def descriptors_fwd(displacements, offsets, neighbor_species,
                    rcut2, roots, W, series, dseries, thresh, ynorm, nl_index, pair_index,
                    X, A):
    N = X.shape[0]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    for i in prange(N):
        jv = np.empty(L + 1, dt)
        djv = np.empty(L + 1, dt)
        g = np.empty(n_nl, dt)
        dg = np.empty(n_nl, dt)
        Cm = np.empty(L, dt)
        Sm = np.empty(L, dt)
        Q = np.empty((L, L), dt)
        dQ = np.empty((L, L), dt)
        Y = np.empty(L * L, dt)
        dY = np.empty((L * L, 3), dt)
        for a in range(S):
            for q in range(n_nlm):
                A[i, a, q] = 0.0
        p0 = min(max(offsets[i], 0), P)
        p1 = min(max(offsets[i + 1], p0), P)
        for p in range(p0, p1):
            s = neighbor_species[p]
            if s < 0 or s >= S:
                continue
            dx = displacements[p, 0]
            dy = displacements[p, 1]
            dz = displacements[p, 2]
            r2 = dx * dx + dy * dy + dz * dz
            if not (r2 > 0.0 and r2 < rcut2[0]):
                continue
            r = math.sqrt(r2)
            ir = 1.0 / r
            _radial(r, roots, W, series, dseries, thresh, nl_index, jv, djv, g, dg)
            _ylm(dx * ir, dy * ir, dz * ir, ynorm, Cm, Sm, Q, dQ, Y, dY)
            for l in range(L):
                for n in range(L - l):
                    c = nl_index[l, n, 0]
                    off = nl_index[l, n, 1]
                    gc = g[c]
                    for q in range(2 * l + 1):
                        A[i, s, off + q] += gc * Y[l * l + q]
        for a in range(S):
            for b in range(a, S):
                base = pair_index[a, b] * n_nl
                for l in range(L):
                    for n in range(L - l):
                        c = nl_index[l, n, 0]
                        off = nl_index[l, n, 1]
                        acc = A[i, a, off] * A[i, b, off]
                        for q in range(1, 2 * l + 1):
                            acc += A[i, a, off + q] * A[i, b, off + q]
                        X[i, base + c] = acc


@njit(parallel=True, **_JIT)
def descriptors_vjp(displacements, offsets, neighbor_species,
                    rcut2, roots, W, series, dseries, thresh, ynorm, nl_index, pair_index,
                    A, X_bar, d_bar):
    N = X_bar.shape[0]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    # Rows outside every centre's run get zeros (the runs overwrite their own rows below).
    for p in prange(P):
        d_bar[p, 0] = 0.0
        d_bar[p, 1] = 0.0
        d_bar[p, 2] = 0.0
    for i in prange(N):
        jv = np.empty(L + 1, dt)
        djv = np.empty(L + 1, dt)
        g = np.empty(n_nl, dt)
        dg = np.empty(n_nl, dt)
        Cm = np.empty(L, dt)
        Sm = np.empty(L, dt)
        Q = np.empty((L, L), dt)
        dQ = np.empty((L, L), dt)
        Y = np.empty(L * L, dt)
        dY = np.empty((L * L, 3), dt)
        G = np.empty(L * L, dt)
        Abar = np.zeros((S, n_nlm), dt)
        # Abar^a = sum_b w_ab Xbar^{(ab)} A^b, w = 2 on the diagonal (X^{aa} = sum A^a A^a).
        for a in range(S):
            for b in range(S):
                base = pair_index[a, b] * n_nl
                w = 2.0 if a == b else 1.0
                for l in range(L):
                    for n in range(L - l):
                        c = nl_index[l, n, 0]
                        off = nl_index[l, n, 1]
                        xb = w * X_bar[i, base + c]
                        for q in range(2 * l + 1):
                            Abar[a, off + q] += xb * A[i, b, off + q]
        p0 = min(max(offsets[i], 0), P)
        p1 = min(max(offsets[i + 1], p0), P)
        for p in range(p0, p1):
            s = neighbor_species[p]
            if s < 0 or s >= S:
                continue
            dx = displacements[p, 0]
            dy = displacements[p, 1]
            dz = displacements[p, 2]
            r2 = dx * dx + dy * dy + dz * dz
            if not (r2 > 0.0 and r2 < rcut2[0]):
                continue
            r = math.sqrt(r2)
            ir = 1.0 / r
            ux = dx * ir
            uy = dy * ir
            uz = dz * ir
            _radial(r, roots, W, series, dseries, thresh, nl_index, jv, djv, g, dg)
            _ylm(ux, uy, uz, ynorm, Cm, Sm, Q, dQ, Y, dY)
            t = dx - dx
            for q in range(L * L):
                G[q] = 0.0
            for l in range(L):
                for n in range(L - l):
                    c = nl_index[l, n, 0]
                    off = nl_index[l, n, 1]
                    gc = g[c]
                    acc = dx - dx
                    for q in range(2 * l + 1):
                        ab = Abar[s, off + q]
                        acc += ab * Y[l * l + q]
                        G[l * l + q] += ab * gc
                    t += dg[c] * acc
            vx = dx - dx
            vy = dx - dx
            vz = dx - dx
            for q in range(L * L):
                vx += G[q] * dY[q, 0]
                vy += G[q] * dY[q, 1]
                vz += G[q] * dY[q, 2]
            uv = ux * vx + uy * vy + uz * vz
            d_bar[p, 0] = ux * t + (vx - ux * uv) * ir
            d_bar[p, 1] = uy * t + (vy - uy * uv) * ir
            d_bar[p, 2] = uz * t + (vz - uz * uv) * ir


@njit(parallel=True, **_JIT)
def descriptors_jvp(displacements, offsets, neighbor_species,
                    rcut2, roots, W, series, dseries, thresh, ynorm, nl_index, pair_index,
                    A, d_dot, X_dot):
    N = X_dot.shape[0]
    P = displacements.shape[0]
    S = pair_index.shape[0]
    L = roots.shape[0]
    n_nl = L * (L + 1) // 2
    n_nlm = A.shape[2]
    dt = displacements.dtype
    for i in prange(N):
        jv = np.empty(L + 1, dt)
        djv = np.empty(L + 1, dt)
        g = np.empty(n_nl, dt)
        dg = np.empty(n_nl, dt)
        Cm = np.empty(L, dt)
        Sm = np.empty(L, dt)
        Q = np.empty((L, L), dt)
        dQ = np.empty((L, L), dt)
        Y = np.empty(L * L, dt)
        dY = np.empty((L * L, 3), dt)
        Yt = np.empty(L * L, dt)
        Adot = np.zeros((S, n_nlm), dt)
        p0 = min(max(offsets[i], 0), P)
        p1 = min(max(offsets[i + 1], p0), P)
        for p in range(p0, p1):
            s = neighbor_species[p]
            if s < 0 or s >= S:
                continue
            dx = displacements[p, 0]
            dy = displacements[p, 1]
            dz = displacements[p, 2]
            r2 = dx * dx + dy * dy + dz * dz
            if not (r2 > 0.0 and r2 < rcut2[0]):
                continue
            r = math.sqrt(r2)
            ir = 1.0 / r
            ux = dx * ir
            uy = dy * ir
            uz = dz * ir
            _radial(r, roots, W, series, dseries, thresh, nl_index, jv, djv, g, dg)
            _ylm(ux, uy, uz, ynorm, Cm, Sm, Q, dQ, Y, dY)
            ex = d_dot[p, 0]
            ey = d_dot[p, 1]
            ez = d_dot[p, 2]
            rho = ux * ex + uy * ey + uz * ez
            tx = (ex - ux * rho) * ir
            ty = (ey - uy * rho) * ir
            tz = (ez - uz * rho) * ir
            for q in range(L * L):
                Yt[q] = dY[q, 0] * tx + dY[q, 1] * ty + dY[q, 2] * tz
            for l in range(L):
                for n in range(L - l):
                    c = nl_index[l, n, 0]
                    off = nl_index[l, n, 1]
                    gc = g[c]
                    dgc = dg[c] * rho
                    for q in range(2 * l + 1):
                        Adot[s, off + q] += dgc * Y[l * l + q] + gc * Yt[l * l + q]
        for a in range(S):
            for b in range(a, S):
                base = pair_index[a, b] * n_nl
                for l in range(L):
                    for n in range(L - l):
                        c = nl_index[l, n, 0]
                        off = nl_index[l, n, 1]
                        acc = Adot[a, off] * A[i, b, off] + A[i, a, off] * Adot[b, off]
                        for q in range(1, 2 * l + 1):
                            acc += Adot[a, off + q] * A[i, b, off + q] + A[i, a, off + q] * Adot[b, off + q]
                        X_dot[i, base + c] = acc


# ---------------------------------------------------------------------------
# Convenience wrappers on numpy arrays (tests, benchmarks)


def _n_features(tables) -> int:
    L = tables[1].shape[0]
    S = tables[8].shape[0]
    return S * (S + 1) // 2 * L * (L + 1) // 2


def forward(displacements, offsets, neighbor_species, tables):
    """(X (N, n_features), A (N, S, n_nlm)) on numpy arrays."""
    N = len(offsets) - 1
    L = tables[1].shape[0]
    S = tables[8].shape[0]
    dt = displacements.dtype
    X = np.empty((N, _n_features(tables)), dt)
    A = np.empty((N, S, n_nlm_of(L - 1)), dt)
    descriptors_fwd(displacements, offsets, neighbor_species, *tables, X, A)
    return X, A


def vjp(displacements, offsets, neighbor_species, tables, A, X_bar):
    """d_bar (P, 3) on numpy arrays."""
    d_bar = np.empty(displacements.shape, displacements.dtype)
    descriptors_vjp(displacements, offsets, neighbor_species, *tables, A, X_bar, d_bar)
    return d_bar


def jvp(displacements, offsets, neighbor_species, tables, A, d_dot):
    """X_dot (N, n_features) on numpy arrays."""
    N = len(offsets) - 1
    X_dot = np.empty((N, _n_features(tables)), displacements.dtype)
    descriptors_jvp(displacements, offsets, neighbor_species, *tables, A, d_dot, X_dot)
    return X_dot
