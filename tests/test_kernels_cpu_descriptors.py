"""The numba descriptor kernels (kernels/cpu/descriptors.py) against the JAX reference.

The kernels are called directly on numpy arrays, with outputs pre-filled with NaN
(XLA hands them uninitialised buffers, so every element must be written).  The
reference runs in float64 inside a ``jax.enable_x64(True)`` context.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralil_fast.descriptors import DescriptorSpec, density_coefficients, descriptors_reference
from neuralil_fast.kernels.cpu import descriptors as K
from neuralil_fast.neighbors import neighbor_pairs_reference

EAN_FILE = "/work/shared/data/ean/ean_dft_60.jsonl"
EAN_SPECIES = ("C", "H", "N", "O")


# ---------------------------------------------------------------------------
# helpers


def run_forward(d, offsets, species, tables):
    N = len(offsets) - 1
    L = tables[2].shape[0]
    S = tables[7].shape[0]
    X = np.full((N, K.n_features_of(tables)), np.nan, d.dtype)
    A = np.full((N, S, K.n_nlm_of(L - 1)), np.nan, d.dtype)
    K.descriptors_fwd(d, offsets, species, *tables, X, A)
    return X, A


def run_vjp(d, offsets, species, tables, A, X_bar):
    """d_bar (P, 3) of X_bar (N, F), or (C, P, 3) of C cotangents (C, N, F) in one call."""
    Xb = X_bar if X_bar.ndim == 3 else X_bar[None]
    d_bar = np.full((len(Xb),) + d.shape, np.nan, d.dtype)
    K.descriptors_vjp(d, offsets, species, *tables, A, np.ascontiguousarray(Xb), d_bar)
    return d_bar if X_bar.ndim == 3 else d_bar[0]


def run_jvp(d, offsets, species, tables, A, d_dot):
    """X_dot (N, F) of d_dot (P, 3), or (C, N, F) of C tangents (C, P, 3) in one call."""
    dd = d_dot if d_dot.ndim == 3 else d_dot[None]
    X_dot = np.full((len(dd), len(offsets) - 1, K.n_features_of(tables)), np.nan, d.dtype)
    K.descriptors_jvp(d, offsets, species, *tables, A, np.ascontiguousarray(dd), X_dot)
    return X_dot if d_dot.ndim == 3 else X_dot[0]


_BUCKET = 1024


@functools.lru_cache(maxsize=None)
def _reference_jit(spec, n_atoms):
    """One compilation per (spec, n_atoms, bucket): far faster than eager op-by-op runs,
    whose first call compiles each primitive on its own (81 s against 36 s at n_max = 14)."""
    def f(d, c, s, X_bar, d_dot):
        g = lambda dd: descriptors_reference(spec, dd, c, s, n_atoms)
        X, pullback = jax.vjp(g, d)
        (d_bar,) = pullback(X_bar)
        _, X_dot = jax.jvp(g, (d,), (d_dot,))
        return X, density_coefficients(spec, d, c, s, n_atoms), d_bar, X_dot
    return jax.jit(f)


def reference(spec, d, centers, species, n_atoms, X_bar, d_dot):
    """(X, A, vjp(X_bar), jvp(d_dot)) of the float64 JAX reference (jitted).

    The pair arrays are padded with padding rows (centre = n_atoms, d = 0) to a multiple
    of _BUCKET so that one compilation serves every pair count of a spec.
    """
    P = len(d)
    pad = -P % _BUCKET
    d = np.concatenate([np.asarray(d, np.float64), np.zeros((pad, 3))])
    d_dot = np.concatenate([np.asarray(d_dot, np.float64), np.zeros((pad, 3))])
    centers = np.concatenate([centers, np.full(pad, n_atoms)])
    species = np.concatenate([species, np.zeros(pad, np.int32)])
    with jax.enable_x64(True):
        out = _reference_jit(spec, n_atoms)(
            jnp.asarray(d), jnp.asarray(centers, jnp.int32), jnp.asarray(species, jnp.int32),
            jnp.asarray(X_bar, jnp.float64), jnp.asarray(d_dot))
        X, A, d_bar, X_dot = (np.asarray(v) for v in out)
    return X, A, d_bar[:P], X_dot


def assert_close(actual, desired, rtol):
    scale = float(np.max(np.abs(desired), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


def check_all(spec, d, centers, species, n_atoms, dtypes, seed=0):
    """Forward, A, vjp, jvp against the reference; jvp is the transpose of the vjp.

    ``dtypes``: {dtype: rtol}.  The reference runs once, in float64, on ``d`` rounded
    to the lowest precision asked for (so every dtype sees exactly the same inputs).
    """
    rng = np.random.default_rng(seed)
    low = np.float32 if np.float32 in dtypes else np.float64
    d = np.asarray(d).astype(low).astype(np.float64)
    X_bar = rng.normal(size=(n_atoms, spec.n_features)).astype(low).astype(np.float64)
    d_dot = rng.normal(size=d.shape).astype(low).astype(np.float64)
    Xr, Ar, gr, tr = reference(spec, d, centers, species, n_atoms, X_bar, d_dot)
    offsets = K.offsets_from_centers(centers, n_atoms)
    species = np.ascontiguousarray(species, np.int32)
    out = {}
    for dtype, rtol in dtypes.items():
        tables = K.make_tables(spec.n_max, spec.r_cut, spec.n_species, dtype)
        dd, xb, ddot = (np.ascontiguousarray(a, dtype) for a in (d, X_bar, d_dot))
        X, A = run_forward(dd, offsets, species, tables)
        assert X.dtype == dtype and A.dtype == dtype
        assert np.all(np.isfinite(X)) and np.all(np.isfinite(A))
        assert_close(X, Xr, rtol)
        assert_close(K.density_from_residual(A, offsets, len(dd)), Ar, rtol)
        g = run_vjp(dd, offsets, species, tables, A, xb)
        assert np.all(np.isfinite(g))
        assert_close(g, gr, rtol)
        t = run_jvp(dd, offsets, species, tables, A, ddot)
        assert np.all(np.isfinite(t))
        assert_close(t, tr, rtol)
        # <vjp(X_bar), d_dot> == <X_bar, jvp(d_dot)>
        lhs = np.sum(g.astype(np.float64) * ddot)
        rhs = np.sum(X_bar * t.astype(np.float64))
        tol = 1e-12 if dtype == np.float64 else 1e-5
        assert abs(lhs - rhs) <= tol * (np.sum(np.abs(g * d_dot)) + 1e-300)
        # several cotangents (tangents) in one call: each as its own call, bit for bit
        xb2 = rng.normal(size=xb.shape).astype(dtype)
        dd2 = rng.normal(size=ddot.shape).astype(dtype)
        g2 = run_vjp(dd, offsets, species, tables, A, np.stack([xb, xb2, xb]))
        t2 = run_jvp(dd, offsets, species, tables, A, np.stack([ddot, dd2]))
        for many, ones in ((g2, (g, run_vjp(dd, offsets, species, tables, A, xb2), g)),
                           (t2, (t, run_jvp(dd, offsets, species, tables, A, dd2)))):
            for c, one in enumerate(ones):
                np.testing.assert_array_equal(many[c], one)
        out[dtype] = (X, A, g, t)
    return out, offsets


# ---------------------------------------------------------------------------
# (a) EAN


def ean_pairs():
    if not os.path.exists(EAN_FILE):
        pytest.skip(f"EAN data not available ({EAN_FILE}: /work/shared absent)")
    with open(EAN_FILE) as f:
        conf = json.loads(f.readline())
    pos = np.asarray(conf["Positions"], np.float64)
    cell = np.diag(np.asarray(conf["Cell-Size"], np.float64))
    symbols = ["N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H"] * 15 + ["N", "O", "O", "O"] * 15
    assert len(symbols) == len(pos) == 225
    sp = np.array([EAN_SPECIES.index(s) for s in symbols], np.int32)
    i, j, S = neighbor_pairs_reference(pos, cell, np.array([True, True, True]), 3.5)
    d = pos[j] + S @ cell - pos[i]
    return d, i.astype(np.int32), sp[j].astype(np.int32), len(pos)


def test_ean_float64():
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    out, _ = check_all(spec, d, centers, species, n, {np.float64: 1e-10})
    assert out[np.float64][0].shape == (225, 150)


def test_ean_float32():
    """float32 kernels against the float64 reference, both on the float32-rounded inputs."""
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    check_all(spec, d, centers, species, n, {np.float32: 1e-5, np.float64: 1e-10})


def test_ean_float32_bessel_path_on_float32_tables():
    """Both float32 paths on float32 tables, within float32 tolerance: the polynomial path
    (make_tables' float32 tables, what kernels_api passes with or without x64) and the
    Bessel path on its float64 tables rounded to float32 (what kernels_api passes without
    x64 where float32 has no polynomials, n_max > 13; here at n_max = 4)."""
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    rng = np.random.default_rng(3)
    d = d.astype(np.float32)
    X_bar = rng.normal(size=(n, spec.n_features)).astype(np.float32)
    d_dot = rng.normal(size=d.shape).astype(np.float32)
    Xr, Ar, gr, tr = reference(spec, d, centers, species, n, X_bar, d_dot)
    offsets = K.offsets_from_centers(centers, n)
    for table_dtype in (np.float32, np.float64):  # the polynomial path, the Bessel path
        tables = tuple(t.astype(np.float32) if t.dtype == np.float64 else t
                       for t in K.make_tables(4, 3.5, 4, table_dtype))
        assert (len(tables[8]) > 0) == (table_dtype == np.float32)
        X, A = run_forward(d, offsets, species, tables)
        assert_close(X, Xr, 1e-5)
        assert_close(K.density_from_residual(A, offsets, len(d)), Ar, 1e-5)
        assert_close(run_vjp(d, offsets, species, tables, A, X_bar), gr, 1e-5)
        assert_close(run_jvp(d, offsets, species, tables, A, d_dot), tr, 1e-5)


def test_ean_with_padding_and_degenerate_rows():
    """Padding rows (centre = n_atoms, d = 0), pairs at r >= r_cut and r = 0 inside a run."""
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    # an r = 0 row and an r > r_cut row in centre 3's run, and 7 padding rows at the end
    k = int(np.searchsorted(centers, 3))
    d = np.concatenate([d[:k], [[0.0, 0.0, 0.0], [3.6, 0.0, 0.0]], d[k:], np.zeros((7, 3))])
    centers = np.concatenate([centers[:k], [3, 3], centers[k:], np.full(7, n)]).astype(np.int32)
    species = np.concatenate([species[:k], [1, 2], species[k:], np.full(7, n)]).astype(np.int32)
    out, offsets = check_all(spec, d, centers, species, n, {np.float64: 1e-10}, seed=1)
    g = out[np.float64][2]
    assert offsets[-1] == len(d) - 7
    assert np.all(g[-7:] == 0.0)
    assert np.all(g[k:k + 2] == 0.0)


# ---------------------------------------------------------------------------
# (b) random triclinic periodic systems


@st.composite
def systems(draw):
    n_species = draw(st.integers(1, 4))
    n_max = draw(st.integers(0, 5))
    r_cut = draw(st.floats(2.0, 5.0))
    n_atoms = 4  # fixed: keeps JAX's per-shape compilation cache warm across examples
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # lower-triangular triclinic cell, rows are lattice vectors
    diag = rng.uniform(3.0, 6.0, 3)
    cell = np.diag(diag)
    cell[1, 0], cell[2, 0], cell[2, 1] = rng.uniform(-1.5, 1.5, 3)
    frac = rng.uniform(0.0, 1.0, (n_atoms, 3))
    pos = frac @ cell
    # a pair at 1e-4 Å and a pair just inside r_cut
    u = rng.normal(size=(2, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pos[1] = pos[0] + 1e-4 * u[0]
    delta = draw(st.sampled_from([1e-9, 1e-6, 1e-3, 0.05]))
    pos[2] = pos[0] + (r_cut - delta) * u[1]
    species = rng.integers(0, n_species, n_atoms).astype(np.int32)
    skin = 0.4  # pairs beyond r_cut too, as in a neighbour list with a skin
    i, j, S = neighbor_pairs_reference(pos, cell, np.array([True, True, True]), r_cut + skin)
    d = pos[j] + S @ cell - pos[i]
    n_pad = draw(st.integers(0, 3))
    d = np.concatenate([d, np.zeros((n_pad, 3))])
    centers = np.concatenate([i, np.full(n_pad, n_atoms)]).astype(np.int32)
    nsp = np.concatenate([species[j], np.full(n_pad, n_atoms)]).astype(np.int32)
    spec = DescriptorSpec(n_species=n_species, r_cut=r_cut, n_max=n_max)
    return spec, d, centers, nsp, n_atoms, seed


_SETTINGS = settings(max_examples=15, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(systems())
def test_random_systems(system):
    """float64 kernels to 1e-10 and float32 kernels to 1e-5 against one float64 reference."""
    spec, d, centers, species, n_atoms, seed = system
    r = np.linalg.norm(d, axis=1)
    assert np.any((r > 0) & (r < 2e-4))  # the tiny pair is there
    assert len(d) <= _BUCKET
    check_all(spec, d, centers, species, n_atoms, {np.float64: 1e-10, np.float32: 1e-5}, seed=seed)


# ---------------------------------------------------------------------------
# tables and edge cases


def test_tables_shapes_and_dtypes():
    for dtype in (np.float32, np.float64):
        t = K.make_tables(4, 3.5, 4, dtype)
        assert len(t) == 9
        assert t[0].dtype == dtype and t[5].dtype == dtype and t[8].dtype == dtype
        for a in t[1:5]:  # radial tables: float64 for the Bessel path
            assert a.dtype == dtype
        for a in t:
            assert a.flags.c_contiguous
        assert t[6].dtype == np.int32 and t[7].dtype == np.int32
        assert t[2].shape == (5, 6) and t[3].shape == (5, 5, 6) and t[5].shape == (5, 5, 3)
        assert t[7].shape == (4, 4) and t[6].shape == (5, 5, 4)
        # radial polynomials: float32 only; degrees from the compiled set
        if dtype == np.float32:
            deg = t[6][..., 2:][np.tril(np.ones((5, 5), bool))[::-1]]
            assert t[8].shape == (15, 2, deg.max() + 1)
            assert set(deg.ravel()) <= set(K._POLY_DEGREES)
        else:
            assert t[8].shape == (0, 2, 1)
    assert K.n_nlm_of(4) == 55
    assert K.n_features_of(K.make_tables(4, 3.5, 4)) == 150
    spec = DescriptorSpec(n_species=3, r_cut=3.0, n_max=3)
    nl_of, _ = spec.nlm_tables()
    assert K.n_nlm_of(3) == len(nl_of)
    for degrees in (None, K.make_tables(4, 3.5, 4, np.float32)[6][..., 2:]):
        fl = K.flop_counts(4, 4, degrees)
        assert set(fl) == {"forward", "vjp", "jvp"}
        assert all(v[0] > 0 and v[1] > 0 for v in fl.values())
    # the path the tables select: Bessel for float64, polynomial for float32
    assert K.flop_counts_of(K.make_tables(4, 3.5, 4, np.float64)) == K.flop_counts(4, 4)
    t32 = K.make_tables(4, 3.5, 4, np.float32)
    assert K.flop_counts_of(t32) == K.flop_counts(4, 4, t32[6][..., 2:])


def test_block_boundaries():
    """Pair counts around the block width, one centre with many pairs, empty centres."""
    rng = np.random.default_rng(5)
    spec = DescriptorSpec(n_species=2, r_cut=3.0, n_max=3)
    n_atoms = 40
    counts = rng.integers(0, 3, n_atoms)
    counts[7] = 3 * K._B + 1
    counts[8] = K._B - 1
    counts[9] = K._B
    counts[10] = K._B + 1
    centers = np.repeat(np.arange(n_atoms), counts).astype(np.int32)
    u = rng.normal(size=(len(centers), 3))
    d = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0.05, 3.2, (len(centers), 1))
    species = rng.integers(0, 2, len(centers)).astype(np.int32)
    check_all(spec, d, centers, species, n_atoms, {np.float64: 1e-10})


@pytest.mark.parametrize("n_species", [1, 6, 7])
def test_lanes_over_chunks(n_species):
    """Several work items of K._W centres, pair counts from 0 to ~3 rows of blocks (groups of
    lanes whose rows straddle blocks), species counts of each specialised vector path (S = 1,
    the largest, 6) and of the generic one (S = 7)."""
    rng = np.random.default_rng(11 + n_species)
    spec = DescriptorSpec(n_species=n_species, r_cut=3.0, n_max=2)
    n_atoms = 2 * K._W + 37
    counts = rng.integers(0, 40, n_atoms)
    counts[rng.choice(n_atoms, 9, replace=False)] = 0
    centers = np.repeat(np.arange(n_atoms), counts).astype(np.int32)
    u = rng.normal(size=(len(centers), 3))
    d = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0.05, 3.4, (len(centers), 1))
    species = rng.integers(0, n_species, len(centers)).astype(np.int32)
    check_all(spec, d, centers, species, n_atoms, {np.float64: 1e-10, np.float32: 1e-5})


def test_same_results_for_any_thread_count():
    """Work items go to whichever thread is free (kernels/cpu/parallel.py): each item is
    still computed by one worker, in the same order, so 1 and 2 threads agree bitwise."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    rng = np.random.default_rng(3)
    n_atoms = 3 * K._W + 5
    counts = rng.integers(0, 30, n_atoms)
    centers = np.repeat(np.arange(n_atoms), counts).astype(np.int32)
    u = rng.normal(size=(len(centers), 3))
    d = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0.5, 3.4, (len(centers), 1))
    species = rng.integers(0, 3, len(centers)).astype(np.int32)
    offsets = K.offsets_from_centers(centers, n_atoms)
    tables = K.make_tables(3, 3.5, 3, np.float32)
    d = d.astype(np.float32)
    X_bar = rng.normal(size=(n_atoms, K.n_features_of(tables))).astype(np.float32)
    d_dot = rng.normal(size=d.shape).astype(np.float32)
    out = []
    old = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            X, A = run_forward(d, offsets, species, tables)
            out.append((X, A, run_vjp(d, offsets, species, tables, A, X_bar),
                        run_jvp(d, offsets, species, tables, A, d_dot)))
    finally:
        numba.set_num_threads(old)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_jvp_ignores_tangents_of_inactive_pairs():
    """A non-finite tangent on a pair beyond r_cut (or of an unknown species) changes nothing."""
    tables = K.make_tables(2, 3.0, 2, np.float64)
    d = np.array([[1.0, 0.5, 0.2], [0.3, -1.0, 0.4], [3.5, 0.0, 0.0], [0.2, 0.2, 0.2]])
    species = np.array([0, 1, 0, 9], np.int32)
    offsets = np.array([0, 4], np.int32)
    _, A = run_forward(d, offsets, species, tables)
    tangent = np.ones_like(d)
    ref = run_jvp(d, offsets, species, tables, A, tangent)
    tangent[2:] = np.nan
    out = run_jvp(d, offsets, species, tables, A, tangent)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, ref)


def test_no_pairs_and_garbage_offsets():
    """Centres without pairs give zeros; offsets outside [0, P] are clamped; unknown species ignored."""
    tables = K.make_tables(2, 3.0, 2, np.float64)
    d = np.array([[1.0, 0.5, 0.2], [0.3, -1.0, 0.4]])
    species = np.array([0, 7], np.int32)  # species 7 does not exist: ignored
    offsets = np.array([0, 2, 2, 99], np.int32)  # centre 2's run is clamped to [2, 2)
    X, A = run_forward(d, offsets, species, tables)
    assert np.all(X[1:] == 0.0) and np.all(K.density_from_residual(A, offsets, 2)[1:] == 0.0)
    X1, _ = run_forward(d[:1], np.array([0, 1, 1, 1], np.int32), species[:1], tables)
    np.testing.assert_allclose(X[0], X1[0], rtol=1e-14)
    g = run_vjp(d, offsets, species, tables, A, np.ones_like(X))
    assert np.all(g[1] == 0.0) and np.all(np.isfinite(g))
    t = run_jvp(d, offsets, species, tables, A, np.ones_like(d))
    assert np.all(t[1:] == 0.0)


def test_high_order_generic_recurrence():
    """n_max = 14: l >= 8 take the generic (non-specialised) Bessel recurrence, and float32
    too takes the Bessel path (its radial polynomials would need a degree above 32)."""
    rng = np.random.default_rng(11)
    spec = DescriptorSpec(n_species=2, r_cut=4.0, n_max=14)
    tables = K.make_tables(14, 4.0, 2, np.float32)
    assert tables[8].shape[0] == 0 and all(t.dtype == np.float64 for t in tables[1:5])
    n_atoms = 3
    centers = np.repeat(np.arange(n_atoms), [5, 0, 7]).astype(np.int32)
    u = rng.normal(size=(len(centers), 3))
    d = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0.02, 3.99, (len(centers), 1))
    species = rng.integers(0, 2, len(centers)).astype(np.int32)
    check_all(spec, d, centers, species, n_atoms, {np.float64: 1e-10, np.float32: 1e-5})


@pytest.mark.parametrize("n_max", [2, 4, 9])
def test_float32_radial_relative_accuracy(n_max):
    """One pair per centre, r from 1e-3 to r_cut - 0.01: each pair's float32 density
    coefficients within 2e-5 of that pair's largest one, also near 0 and r_cut where all of
    them vanish (the polynomial path keeps the factors r^l and (r_cut^2 - r^2)^3 exact).
    At 0.01 Å from r_cut g_nl is ~1e-8 of its maximum: a float32 error of 1e-7 of the
    maximum would fail here by orders of magnitude.  (Closer, the float64 reference itself
    is no better than its rounded Bessel roots, ~1e-16 absolute.)"""
    r_cut = 3.5
    spec = DescriptorSpec(n_species=1, r_cut=r_cut, n_max=n_max)
    tables = K.make_tables(n_max, r_cut, 1, np.float32)
    assert tables[8].shape[0] == (n_max + 1) * (n_max + 2) // 2
    rng = np.random.default_rng(n_max)
    r = np.concatenate([np.geomspace(1e-3, 0.5, 40), np.linspace(0.5, 3.4, 60),
                        r_cut - np.geomspace(1e-1, 1e-2, 40)])
    u = rng.normal(size=(len(r), 3))
    d = (u / np.linalg.norm(u, axis=1, keepdims=True) * r[:, None]).astype(np.float32)
    n = len(r)
    centers = np.arange(n, dtype=np.int32)
    species = np.zeros(n, np.int32)
    offsets = K.offsets_from_centers(centers, n)
    _, A = run_forward(d, offsets, species, tables)
    A = K.density_from_residual(A, offsets, len(d))
    with jax.enable_x64(True):
        Ar = np.asarray(density_coefficients(spec, jnp.asarray(d, jnp.float64),
                                             jnp.asarray(centers), jnp.asarray(species), n))
    scale = np.max(np.abs(Ar), axis=(1, 2), keepdims=True)
    assert np.all(scale > 0)
    err = np.abs(A.astype(np.float64) - Ar) / scale
    assert err.max() < 2e-5, (err.max(), r[np.argmax(err.max(axis=(1, 2)))])


def test_empty_inputs():
    tables = K.make_tables(3, 3.0, 2, np.float64)
    # no atoms, only padding rows
    d = np.zeros((5, 3))
    sp = np.zeros(5, np.int32)
    offsets = np.zeros(1, np.int32)
    X, A = run_forward(d, offsets, sp, tables)
    assert X.shape == (0, K.n_features_of(tables))
    g = run_vjp(d, offsets, sp, tables, A, X)
    assert np.all(g == 0.0)
    # atoms, no pairs
    offsets = np.zeros(4, np.int32)
    d0 = np.zeros((0, 3))
    X, A = run_forward(d0, offsets, np.zeros(0, np.int32), tables)
    assert np.all(X == 0.0) and np.all(A == 0.0)
    t = run_jvp(d0, offsets, np.zeros(0, np.int32), tables, A, d0)
    assert np.all(t == 0.0)


def test_unrolled_ylm_is_generated_and_bitwise_equal():
    """ylm_unrolled.py is what its generator writes now (with descriptors.py's constants),
    and each unrolled Y_lm / gradient equals _ylm_block's bit for bit."""
    from neuralil_fast.kernels.cpu import gen_ylm_unrolled as gen
    from neuralil_fast.kernels.cpu import ylm_unrolled

    assert (gen.B, gen.C_ZERO, gen.JIT) == (K._B, K._C_ZERO, K._JIT)
    with open(gen.TARGET) as f:
        assert f.read() == gen.source(), "run python -m neuralil_fast.kernels.cpu.gen_ylm_unrolled"
    rng = np.random.default_rng(2)
    for L, fn in ylm_unrolled.BY_L.items():
        for dtype in (np.float32, np.float64):
            tables = K.make_tables(L - 1, 3.0, 1, dtype)
            consts, ylm = tables[0], tables[5]
            u = rng.normal(size=(3, K._B))
            u /= np.linalg.norm(u, axis=0)
            u[:, 0] = (0.0, 0.0, 1.0)
            ux, uy, uz = (np.ascontiguousarray(v, dtype) for v in u)
            scratch = [np.empty((L, K._B), dtype) for _ in range(2)]
            scratch += [np.empty(K._B, dtype) for _ in range(4)]
            for deriv in (False, True):
                want = (np.full((L * L, K._B), np.nan, dtype), np.full((3, L * L, K._B), np.nan, dtype))
                got = (np.full_like(want[0], np.nan), np.full_like(want[1], np.nan))
                K._ylm_block(ux, uy, uz, consts, ylm, deriv, *scratch, *want)
                fn(ux, uy, uz, consts, ylm, deriv, *got)
                np.testing.assert_array_equal(got[0], want[0])
                if deriv:
                    np.testing.assert_array_equal(got[1], want[1])
