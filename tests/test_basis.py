"""neuralil_fast.basis: spherical Bessel functions and the orthonormal radial basis.

Oracles: scipy.special.spherical_jn, roots found here with brentq on a sign scan,
Gauss-Legendre quadrature of the Gram matrix, an independent Cholesky
orthonormalisation of the design's f_nl built from scipy.
"""
from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.optimize import brentq
from scipy.special import eval_legendre
from scipy.special import spherical_jn as sp_jn

from neuralil_fast.basis import (
    RadialBasis,
    legendre,
    nl_pairs,
    radial_basis,
    real_spherical_harmonics,
    spherical_jn,
)

# --------------------------------------------------------------------------- oracles


@lru_cache(maxsize=None)
def scipy_roots(l: int, count: int) -> np.ndarray:
    """First ``count`` positive roots of j_l: sign changes on a fine grid, then brentq."""
    x = np.linspace(1e-3, (count + l / 2 + 3) * np.pi, 20000)
    y = sp_jn(l, x)
    idx = np.flatnonzero(np.sign(y[:-1]) * np.sign(y[1:]) < 0)[:count]
    assert len(idx) == count
    return np.array([brentq(lambda t: sp_jn(l, t), x[k], x[k + 1], xtol=1e-15, rtol=1e-15) for k in idx])


def gauss_legendre(r_c: float, n: int = 240):
    t, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * r_c * (t + 1.0), 0.5 * r_c * w


def oracle_f(n_max: int, r_c: float, r: np.ndarray) -> dict:
    """f_nl(r) of the design (§1) from scipy, keyed by (n, l)."""
    out = {}
    for l in range(n_max + 1):
        u = scipy_roots(l, n_max - l + 2)
        for n in range(n_max - l + 1):
            norm = np.sqrt(2.0 / (u[n] ** 2 + u[n + 1] ** 2))
            c1 = u[n + 1] / sp_jn(l + 1, u[n]) * norm
            c2 = u[n] / sp_jn(l + 1, u[n + 1]) * norm
            f = (c1 * sp_jn(l, u[n] * r / r_c) - c2 * sp_jn(l, u[n + 1] * r / r_c)) / r_c**1.5
            out[(n, l)] = np.where(r < r_c, f, 0.0)
    return out


def oracle_g(n_max: int, r_c: float, r: np.ndarray) -> np.ndarray:
    """The orthonormal g_nl(r), (len(r), n_nl): Gram-Schmidt (Cholesky) of f_0l, f_1l, ...
    with weight r^2 on [0, r_c] -- the unique lower-triangular, positive-diagonal
    orthonormalisation, which the design's recurrence must reproduce."""
    rq, wq = gauss_legendre(r_c)
    fq = oracle_f(n_max, r_c, rq)
    fr = oracle_f(n_max, r_c, np.asarray(r, np.float64))
    cols = []
    for l in range(n_max + 1):
        F = np.stack([fq[(n, l)] for n in range(n_max - l + 1)])
        gram = (F * wq * rq**2) @ F.T
        L = np.linalg.cholesky(gram)
        Fr = np.stack([fr[(n, l)] for n in range(n_max - l + 1)])
        cols.append(np.linalg.solve(L, Fr).T)
    return np.concatenate(cols, axis=-1)


# --------------------------------------------------------------------------- spherical_jn


def test_spherical_jn_float64_vs_scipy(x64):
    x = np.concatenate([np.linspace(0.0, 40.0, 20001), np.geomspace(1e-9, 2.0, 3000)])
    got = jax.jit(spherical_jn, static_argnums=0)(8, jnp.asarray(x, jnp.float64))
    assert len(got) == 9
    for l in range(9):
        ref = sp_jn(l, x)
        g = np.asarray(got[l])
        assert g.dtype == np.float64 and g.shape == x.shape
        scale = np.abs(ref).max()
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-13 * scale, err_msg=f"l={l}")
        # relative accuracy where j_l is small (series branch near 0)
        small = (x > 0) & (x < 1.0)
        np.testing.assert_allclose(g[small], ref[small], rtol=1e-12, atol=0, err_msg=f"l={l} small x")
    assert float(got[0][0]) == 1.0 and all(float(got[l][0]) == 0.0 for l in range(1, 9))


def test_spherical_jn_float32_vs_scipy():
    # float32: upward recurrence just above the series threshold loses up to ~100 ulp
    # (relative to the scale of j_l), by design of the threshold.
    x = np.linspace(0.0, 40.0, 4001).astype(np.float32)
    got = jax.jit(spherical_jn, static_argnums=0)(8, jnp.asarray(x))
    for l in range(9):
        assert got[l].dtype == jnp.float32
        ref = sp_jn(l, x.astype(np.float64))
        np.testing.assert_allclose(np.asarray(got[l]), ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=f"l={l}")


def test_spherical_jn_derivative_finite_everywhere(x64):
    # j_l'(x) = j_{l-1}(x) - (l+1)/x j_l(x); at 0: 1/3 for l=1, else 0.
    x = jnp.asarray(np.concatenate([[0.0, 1e-12, 1e-6], np.linspace(0.01, 30.0, 301)]))
    for l in range(6):
        d = jax.jit(jax.vmap(jax.grad(lambda t: spherical_jn(l, t)[l])))(x)
        d = np.asarray(d)
        assert np.isfinite(d).all()
        xn = np.asarray(x)
        ref = sp_jn(l, xn, derivative=True)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-11, err_msg=f"l={l}")


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("n_max", [0, 1, 4, 6])
def test_roots_match_brentq(n_max):
    b = radial_basis(n_max, 3.5)
    assert b.roots.shape == (n_max + 1, n_max + 2)
    for l in range(n_max + 1):
        count = n_max - l + 2
        ref = scipy_roots(l, count)
        np.testing.assert_allclose(b.roots[l, :count], ref, rtol=1e-13)
        assert np.all(np.abs(sp_jn(l, b.roots[l, :count])) < 1e-13)
    np.testing.assert_allclose(b.roots[0, :], np.pi * np.arange(1, n_max + 3), rtol=1e-15)


def test_tables_are_read_only_and_cached():
    b = radial_basis(4, 3.5)
    assert radial_basis(4, 3.5) is b
    assert radial_basis(4, 3.5000) is b
    assert radial_basis(3, 3.5) is not b
    assert isinstance(b, RadialBasis)
    for arr in (b.roots, b.c1, b.c2, *b.transforms):
        assert arr.dtype == np.float64
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0
    with pytest.raises(Exception):
        b.n_max = 5  # frozen dataclass
    assert b.n_nl == 15 and len(b.nl) == 15


def test_nl_order():
    assert nl_pairs(2) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2)]
    assert len(nl_pairs(4)) == 15


@pytest.mark.parametrize("n_max, r_cut", [(-1, 3.5), (2, 0.0), (2, -1.0), (2, float("nan"))])
def test_bad_basis_parameters(n_max, r_cut):
    with pytest.raises(ValueError, match="n_max|r_cut"):
        radial_basis(n_max, r_cut)


# --------------------------------------------------------------------------- g_nl


@pytest.mark.parametrize("n_max, r_c", [(0, 2.0), (4, 3.5), (6, 5.0)])
def test_orthonormal(x64, n_max, r_c):
    b = radial_basis(n_max, r_c)
    r, w = gauss_legendre(r_c)
    g = np.asarray(jax.jit(b)(jnp.asarray(r)))
    assert g.shape == (len(r), b.n_nl)
    ls = np.array([l for (_, l) in b.nl])
    for l in range(n_max + 1):
        cols = np.flatnonzero(ls == l)
        gram = (g[:, cols].T * w * r**2) @ g[:, cols]
        np.testing.assert_allclose(gram, np.eye(len(cols)), atol=1e-8)


@pytest.mark.parametrize("n_max, r_c", [(0, 2.0), (4, 3.5), (5, 4.2)])
def test_g_matches_independent_orthonormalisation(x64, n_max, r_c):
    r = np.concatenate([[0.0, 1e-6], np.linspace(0.01, r_c * 0.999, 300)])
    got = np.asarray(jax.jit(radial_basis(n_max, r_c))(jnp.asarray(r)))
    ref = oracle_g(n_max, r_c, r)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_orthonormal_with_scipy_quad(x64):
    """A second, adaptive quadrature for a few pairs (n_max 4, r_c 3.5)."""
    from scipy.integrate import quad

    b = radial_basis(4, 3.5)
    bj = jax.jit(b)
    idx = {nl: k for k, nl in enumerate(b.nl)}
    for (n1, l), (n2, l2) in [((0, 0), (0, 0)), ((0, 0), (3, 0)), ((1, 1), (2, 1)), ((0, 4), (0, 4))]:
        assert l == l2

        def integrand(t):
            v = np.asarray(bj(jnp.asarray([t])))[0]
            return v[idx[(n1, l)]] * v[idx[(n2, l)]] * t * t

        val, err = quad(integrand, 0.0, 3.5, epsabs=1e-12, epsrel=1e-12, limit=200)
        assert abs(val - (n1 == n2)) < 1e-8, ((n1, l), (n2, l), val)


def test_vanishes_at_cutoff(x64):
    r_c = 3.5
    b = radial_basis(4, r_c)
    bj, dbj, gradsum = jax.jit(b), jax.jit(jax.jacfwd(b)), jax.jit(jax.grad(lambda t: jnp.sum(b(t))))
    g = lambda r: bj(jnp.asarray(r, jnp.float64))
    dg = lambda r: dbj(jnp.asarray(r, jnp.float64))
    r_grid = np.linspace(0.0, r_c, 2001)
    g_scale = np.abs(np.asarray(g(r_grid))).max()
    dg_scale = np.abs(np.asarray(jax.jit(jax.vmap(jax.jacfwd(b)))(jnp.asarray(r_grid)))).max()
    below = r_c * (1 - 1e-9)
    assert np.abs(np.asarray(g(below))).max() < 1e-10 * g_scale
    assert np.abs(np.asarray(dg(below))).max() < 1e-6 * dg_scale
    # the oracle's f and f' vanish there too (the design's claim)
    for r in (r_c, r_c * (1 + 1e-12), r_c + 1e-3, 2 * r_c, 1e6):
        np.testing.assert_array_equal(np.asarray(g(r)), 0.0)
        np.testing.assert_array_equal(np.asarray(dg(r)), 0.0)
        np.testing.assert_array_equal(np.asarray(gradsum(jnp.float64(r))), 0.0)


def test_oracle_f_vanishes_at_cutoff():
    # sanity of the design formulas used as the oracle: f(r_c) = 0 and f'(r_c) = 0
    r_c, h = 3.5, 1e-5
    fa = oracle_f(4, r_c, np.array([r_c - h, r_c - 2 * h]))
    for key, v in fa.items():
        assert abs(v[0]) < 1e-8 and abs(v[1] - v[0]) < 1e-8, key


def test_no_nan_and_grad_at_small_r(x64):
    b = radial_basis(4, 3.5)
    r = jnp.asarray([0.0, 1e-12, 1e-6, 0.3, 1.1, 2.7, 3.4])
    v = jax.jit(b)(r)
    jf = jax.jit(jax.vmap(jax.jacfwd(b)))(r)
    jr = jax.jit(jax.vmap(jax.jacrev(b)))(r)
    for a in (v, jf, jr):
        assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(np.asarray(jf), np.asarray(jr), rtol=1e-12, atol=1e-12)
    # at 0: only l = 0 functions are non-zero; the derivative only for l = 1 (j_1 ~ x/3)
    ls = np.array([l for (_, l) in b.nl])
    assert np.all(np.asarray(v)[0, ls > 0] == 0.0)
    assert np.all(np.asarray(jf)[0, ls != 1] == 0.0)
    np.testing.assert_allclose(np.asarray(v), oracle_g(4, 3.5, np.asarray(r)), atol=1e-11)
    # dg/dr from central differences of the oracle
    rr = np.asarray(r)[2:]
    h = 1e-6
    fd = (oracle_g(4, 3.5, rr + h) - oracle_g(4, 3.5, rr - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(jf)[2:], fd, atol=1e-7 * np.abs(fd).max())


def test_check_grads(x64):
    b = radial_basis(4, 3.5)
    rs = jnp.asarray([1e-6, 3e-6, 0.5, 1.7, 3.0, 3.49], jnp.float64)
    check_grads(jax.jit(b), (rs,), order=1, modes=("fwd", "rev"), eps=2.5e-7)


def test_check_grads_second_order(x64):
    # order 2 is costly to trace: a small basis (l = 0, 1: series and recurrence branches)
    b = radial_basis(1, 3.5)
    check_grads(jax.jit(b), (jnp.asarray([1e-6, 3e-6, 0.5, 1.7, 3.0, 3.49]),), order=2,
                modes=("fwd", "rev"), eps=2.5e-7)


def test_g_float32(x64):
    b = radial_basis(4, 3.5)
    r = np.linspace(0.0, 3.6, 500)
    ref = np.asarray(jax.jit(b)(jnp.asarray(r, jnp.float64)))
    with jax.enable_x64(False):
        got = jax.jit(b)(jnp.asarray(r, jnp.float32))
        assert got.dtype == jnp.float32
        got = np.asarray(got)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------- angular parts


def test_real_spherical_harmonics_addition_theorem(x64):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    b = rng.normal(size=(50, 3))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    l_max = 6
    Ya = np.asarray(real_spherical_harmonics(l_max, jnp.asarray(a)))
    Yb = np.asarray(real_spherical_harmonics(l_max, jnp.asarray(b)))
    cos = np.sum(a * b, axis=1)
    for l in range(l_max + 1):
        sl = slice(l * l, (l + 1) ** 2)
        lhs = np.sum(Ya[:, sl] * Yb[:, sl], axis=1)
        rhs = (2 * l + 1) / (4 * math.pi) * eval_legendre(l, cos)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-13)
    # orthonormality on the sphere (Lebedev-free check: Monte Carlo is too coarse; use
    # a product Gauss grid in (cos θ, φ))
    t, wt = np.polynomial.legendre.leggauss(20)
    phi = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    T, PHI = np.meshgrid(t, phi, indexing="ij")
    s = np.sqrt(1 - T**2)
    u = np.stack([s * np.cos(PHI), s * np.sin(PHI), T], axis=-1).reshape(-1, 3)
    w = (wt[:, None] * np.full(len(phi), 2 * np.pi / len(phi))[None, :]).reshape(-1)
    Y = np.asarray(real_spherical_harmonics(l_max, jnp.asarray(u)))
    np.testing.assert_allclose((Y.T * w) @ Y, np.eye((l_max + 1) ** 2), atol=1e-12)


def test_legendre_vs_scipy(x64):
    t = np.linspace(-1, 1, 101)
    P = legendre(7, jnp.asarray(t))
    for l in range(8):
        np.testing.assert_allclose(np.asarray(P[l]), eval_legendre(l, t), atol=1e-13)
