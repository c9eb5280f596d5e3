"""Spherical Bessel radial basis and real spherical harmonics (neuralil-model.md §1-2).

Tables (roots u_{l,k}, coefficients c1, c2, the orthogonalisation matrices T_l)
are float64 numpy, computed once per (n_max, r_cut) and cached in an immutable
:class:`RadialBasis`.  Evaluation is pure JAX, in the dtype of its input.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

__all__ = ["RadialBasis", "radial_basis", "spherical_jn", "real_spherical_harmonics", "nl_pairs"]


def nl_pairs(n_max: int) -> list[tuple[int, int]]:
    """(n, l) in NeuralIL's l-major order: l = 0 with n = 0..n_max, l = 1 with n = 0..n_max-1, ..."""
    return [(n, l) for l in range(n_max + 1) for n in range(n_max - l + 1)]


def _bessel_roots(l_max: int, count0: int) -> list[np.ndarray]:
    """roots[l][k]: the k-th positive root of j_l; roots of j_l interlace those of j_{l-1}."""
    from scipy.optimize import brentq
    from scipy.special import spherical_jn as sjn

    roots = [np.pi * np.arange(1, count0 + 1, dtype=np.float64)]
    for l in range(1, l_max + 1):
        prev = roots[-1]
        roots.append(np.array([
            brentq(lambda x: sjn(l, x), prev[k], prev[k + 1], xtol=1e-14, rtol=1e-15, maxiter=200)
            for k in range(len(prev) - 1)
        ]))
    return roots


def _series_threshold(l: int) -> float:
    """x below which j_l uses its power series: upward recurrence loses about
    (2l-1)!!(2l+1)!!/x^(2l+1) in relative accuracy; keep that under 100."""
    if l == 0:
        return 0.5
    dfact = math.prod(range(1, 2 * l, 2)) * math.prod(range(1, 2 * l + 2, 2))
    return max(0.5, (dfact / 100.0) ** (1.0 / (2 * l + 1)))


_SERIES_TERMS = 20


def spherical_jn(l_max: int, x):
    """[j_0(x), ..., j_{l_max}(x)], each shaped like x; smooth, finite derivatives for all x >= 0.

    Upward recurrence from sin/cos where it is accurate, power series below a
    per-l threshold (no division by small x on either branch).
    """
    x = jnp.asarray(x)
    out = []
    # Recurrence branch on x kept away from 0 (the series branch covers small x).
    thresholds = [_series_threshold(l) for l in range(l_max + 1)]
    xs = jnp.maximum(x, 0.25)
    s, c = jnp.sin(xs), jnp.cos(xs)
    inv = 1.0 / xs
    j_prev = s * inv
    rec = [j_prev]
    if l_max >= 1:
        j_cur = (s * inv - c) * inv
        rec.append(j_cur)
        for l in range(1, l_max):
            j_next = (2 * l + 1) * inv * j_cur - j_prev
            rec.append(j_next)
            j_prev, j_cur = j_cur, j_next
    x2 = x * x
    for l in range(l_max + 1):
        # j_l(x) = x^l / (2l+1)!! * sum_k (-x^2/2)^k / (k! (2l+3)(2l+5)...(2l+2k+1))
        coef = 1.0 / math.prod(range(1, 2 * l + 2, 2))
        term = jnp.full_like(x, coef)
        total = term
        for k in range(1, _SERIES_TERMS):
            term = term * (-x2 / (2.0 * k * (2 * l + 2 * k + 1)))
            total = total + term
        series = total * x**l
        out.append(jnp.where(x < thresholds[l], series, rec[l]))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class RadialBasis:
    """Orthonormal spherical Bessel radial functions g_nl(r) on [0, r_cut].

    roots: (n_max+1, n_max+2) u_{l,k} (row l valid for k <= n_max - l + 1).
    c1, c2: (n_max+1, n_max+1) coefficients of f_nl (entry [l, n]).
    transforms: per l, (n_max-l+1, n_max-l+1) lower-triangular T_l with g_l = T_l f_l.
    All float64 numpy, read-only.
    """

    n_max: int
    r_cut: float
    roots: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    transforms: tuple

    @property
    def n_nl(self) -> int:
        return (self.n_max + 1) * (self.n_max + 2) // 2

    @property
    def nl(self) -> list[tuple[int, int]]:
        return nl_pairs(self.n_max)

    def __call__(self, r):
        """g_nl(r): (..., n_nl) in l-major (n, l) order for r (...) in Å, units Å^(-3/2).

        Exactly 0 for r >= r_cut; the caller masks r == 0 pairs it does not want.
        """
        r = jnp.asarray(r)
        dtype = r.dtype
        inside = r < self.r_cut
        r_in = jnp.where(inside, r, 0.0)
        cols = []
        for l in range(self.n_max + 1):
            m = self.n_max - l + 1
            u = jnp.asarray(self.roots[l, : m + 1] / self.r_cut, dtype)
            jl = spherical_jn(l, r_in[..., None] * u)[l]  # (..., m+1)
            f = (jnp.asarray(self.c1[l, :m], dtype) * jl[..., :m]
                 - jnp.asarray(self.c2[l, :m], dtype) * jl[..., 1: m + 1]) / self.r_cut**1.5
            cols.append(f @ jnp.asarray(self.transforms[l].T, dtype))
        g = jnp.concatenate(cols, axis=-1)
        return jnp.where(inside[..., None], g, 0.0)


@functools.lru_cache(maxsize=32)
def radial_basis(n_max: int, r_cut: float) -> RadialBasis:
    """The cached, immutable basis for (n_max, r_cut)."""
    from scipy.special import spherical_jn as sjn

    n_max = int(n_max)
    r_cut = float(r_cut)
    if n_max < 0:
        raise ValueError(f"n_max must be >= 0, got {n_max}")
    if not (math.isfinite(r_cut) and r_cut > 0):
        raise ValueError(f"r_cut must be a positive finite number of Å, got {r_cut}")
    all_roots = _bessel_roots(n_max, n_max + 2)
    roots = np.zeros((n_max + 1, n_max + 2))
    c1 = np.zeros((n_max + 1, n_max + 1))
    c2 = np.zeros((n_max + 1, n_max + 1))
    transforms = []
    for l in range(n_max + 1):
        m = n_max - l + 1
        u = all_roots[l][: m + 1]
        roots[l, : m + 1] = u
        for n in range(m):
            norm = np.sqrt(2.0 / (u[n] ** 2 + u[n + 1] ** 2))
            c1[l, n] = u[n + 1] / sjn(l + 1, u[n]) * norm
            c2[l, n] = u[n] / sjn(l + 1, u[n + 1]) * norm
        v = u**2
        T = np.zeros((m, m))
        T[0, 0] = 1.0
        d_prev = 1.0
        for n in range(1, m):
            e = v[n - 1] * v[n + 1] / ((v[n - 1] + v[n]) * (v[n] + v[n + 1]))
            d = 1.0 - e / d_prev
            T[n] = np.sqrt(e / d_prev) * T[n - 1]
            T[n, n] += 1.0
            T[n] /= np.sqrt(d)
            d_prev = d
        T.setflags(write=False)
        transforms.append(T)
    for a in (roots, c1, c2):
        a.setflags(write=False)
    return RadialBasis(n_max, r_cut, roots, c1, c2, tuple(transforms))


def real_spherical_harmonics(l_max: int, u):
    """Real Y_lm(û) for a unit vector u (..., 3): (..., (l_max+1)^2), index l*l + l + m.

    Normalised so that sum_m Y_lm(a) Y_lm(b) = (2l+1)/(4π) P_l(a·b).  Polynomial
    in the components of u (no angles), so smooth everywhere.
    """
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    # C_m + i S_m = (x + i y)^m
    C = [jnp.ones_like(x)]
    S = [jnp.zeros_like(x)]
    for m in range(1, l_max + 1):
        C.append(x * C[-1] - y * S[-1])
        S.append(x * S[-1] + y * C[-2])
    # Q[l][m] = P_l^m(z) / (1 - z^2)^(m/2), without the Condon-Shortley phase.
    Q = [[None] * (l_max + 1) for _ in range(l_max + 1)]
    for m in range(l_max + 1):
        Q[m][m] = jnp.full_like(z, float(math.prod(range(1, 2 * m, 2))))
        if m + 1 <= l_max:
            Q[m + 1][m] = (2 * m + 1) * z * Q[m][m]
        for l in range(m + 2, l_max + 1):
            Q[l][m] = ((2 * l - 1) * z * Q[l - 1][m] - (l + m - 1) * Q[l - 2][m]) / (l - m)
    out = []
    for l in range(l_max + 1):
        row = [None] * (2 * l + 1)
        for m in range(l + 1):
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
            if m == 0:
                row[l] = norm * Q[l][0]
            else:
                row[l + m] = math.sqrt(2.0) * norm * Q[l][m] * C[m]
                row[l - m] = math.sqrt(2.0) * norm * Q[l][m] * S[m]
        out.extend(row)
    return jnp.stack(out, axis=-1)


def legendre(l_max: int, t):
    """[P_0(t), ..., P_{l_max}(t)] by Bonnet's recurrence."""
    P = [jnp.ones_like(t)]
    if l_max >= 1:
        P.append(t)
    for l in range(1, l_max):
        P.append(((2 * l + 1) * t * P[l] - l * P[l - 1]) / (l + 1))
    return P
