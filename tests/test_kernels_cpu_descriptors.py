"""The numba descriptor kernels (kernels/cpu/descriptors.py) against the JAX reference.

The kernels are called directly on numpy arrays, with outputs pre-filled with NaN
(XLA hands them uninitialised buffers, so every element must be written).  The
reference runs in float64 inside a ``jax.enable_x64(True)`` context.
"""
from __future__ import annotations

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
    L = tables[1].shape[0]
    S = tables[8].shape[0]
    nf = S * (S + 1) // 2 * L * (L + 1) // 2
    X = np.full((N, nf), np.nan, d.dtype)
    A = np.full((N, S, K.n_nlm_of(L - 1)), np.nan, d.dtype)
    K.descriptors_fwd(d, offsets, species, *tables, X, A)
    return X, A


def run_vjp(d, offsets, species, tables, A, X_bar):
    d_bar = np.full(d.shape, np.nan, d.dtype)
    K.descriptors_vjp(d, offsets, species, *tables, A, X_bar, d_bar)
    return d_bar


def run_jvp(d, offsets, species, tables, A, d_dot):
    X_dot = np.full((len(offsets) - 1, A.shape[1] * (A.shape[1] + 1) // 2
                     * (tables[1].shape[0] * (tables[1].shape[0] + 1) // 2)), np.nan, d.dtype)
    K.descriptors_jvp(d, offsets, species, *tables, A, d_dot, X_dot)
    return X_dot


def reference(spec, d, centers, species, n_atoms, X_bar, d_dot):
    """(X, A, vjp(X_bar), jvp(d_dot)) of the float64 JAX reference."""
    with jax.enable_x64(True):
        d64 = jnp.asarray(np.asarray(d, np.float64))
        c = jnp.asarray(centers, jnp.int32)
        s = jnp.asarray(species, jnp.int32)
        f = lambda dd: descriptors_reference(spec, dd, c, s, n_atoms)
        X, pullback = jax.vjp(f, d64)
        (d_bar,) = pullback(jnp.asarray(X_bar, jnp.float64))
        _, X_dot = jax.jvp(f, (d64,), (jnp.asarray(d_dot, jnp.float64),))
        A = density_coefficients(spec, d64, c, s, n_atoms)
        return tuple(np.asarray(v) for v in (X, A, d_bar, X_dot))


def assert_close(actual, desired, rtol):
    scale = float(np.max(np.abs(desired), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


def check_all(spec, d, centers, species, n_atoms, dtype, rtol, seed=0):
    """Forward, A, vjp, jvp against the reference; jvp is the transpose of the vjp."""
    rng = np.random.default_rng(seed)
    d = np.ascontiguousarray(d, dtype)
    X_bar = rng.normal(size=(n_atoms, spec.n_features)).astype(dtype)
    d_dot = rng.normal(size=d.shape).astype(dtype)
    Xr, Ar, gr, tr = reference(spec, d, centers, species, n_atoms, X_bar, d_dot)
    offsets = K.offsets_from_centers(centers, n_atoms)
    tables = K.make_tables(spec.n_max, spec.r_cut, spec.n_species, dtype)
    species = np.ascontiguousarray(species, np.int32)
    X, A = run_forward(d, offsets, species, tables)
    assert X.dtype == dtype and A.dtype == dtype
    assert np.all(np.isfinite(X)) and np.all(np.isfinite(A))
    assert_close(X, Xr, rtol)
    assert_close(A, Ar, rtol)
    g = run_vjp(d, offsets, species, tables, A, X_bar)
    assert np.all(np.isfinite(g))
    assert_close(g, gr, rtol)
    t = run_jvp(d, offsets, species, tables, A, d_dot)
    assert np.all(np.isfinite(t))
    assert_close(t, tr, rtol)
    # <vjp(X_bar), d_dot> == <X_bar, jvp(d_dot)>
    lhs = np.sum(g.astype(np.float64) * d_dot)
    rhs = np.sum(X_bar.astype(np.float64) * t)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    assert abs(lhs - rhs) <= tol * (np.sum(np.abs(g * d_dot)) + 1e-300)
    return X, A, g, t, offsets


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


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_ean(dtype, rtol):
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    X, *_ = check_all(spec, d, centers, species, n, dtype, rtol)
    assert X.shape == (225, 150)


def test_ean_with_padding_and_degenerate_rows():
    """Padding rows (centre = n_atoms, d = 0), pairs at r >= r_cut and r = 0 inside a run."""
    d, centers, species, n = ean_pairs()
    spec = DescriptorSpec(n_species=4, r_cut=3.5, n_max=4)
    # an r = 0 row and an r > r_cut row in centre 3's run, and 7 padding rows at the end
    k = int(np.searchsorted(centers, 3))
    d = np.concatenate([d[:k], [[0.0, 0.0, 0.0], [3.6, 0.0, 0.0]], d[k:], np.zeros((7, 3))])
    centers = np.concatenate([centers[:k], [3, 3], centers[k:], np.full(7, n)]).astype(np.int32)
    species = np.concatenate([species[:k], [1, 2], species[k:], np.full(7, n)]).astype(np.int32)
    _, _, g, _, offsets = check_all(spec, d, centers, species, n, np.float64, 1e-10, seed=1)
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
    n_atoms = draw(st.integers(3, 5))
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


_SETTINGS = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(systems())
def test_random_systems_float64(system):
    spec, d, centers, species, n_atoms, seed = system
    r = np.linalg.norm(d, axis=1)
    assert np.any((r > 0) & (r < 2e-4))  # the tiny pair is there
    check_all(spec, d, centers, species, n_atoms, np.float64, 1e-10, seed=seed)


@_SETTINGS
@given(systems())
def test_random_systems_float32(system):
    spec, d, centers, species, n_atoms, seed = system
    check_all(spec, d, centers, species, n_atoms, np.float32, 1e-5, seed=seed)


# ---------------------------------------------------------------------------
# tables and edge cases


def test_tables_shapes_and_dtypes():
    for dtype in (np.float32, np.float64):
        t = K.make_tables(4, 3.5, 4, dtype)
        assert len(t) == 9
        for a in t[:7]:
            assert a.dtype == dtype and a.flags.c_contiguous
        assert t[7].dtype == np.int32 and t[8].dtype == np.int32
        assert t[1].shape == (5, 6) and t[2].shape == (5, 5, 6)
    assert K.n_nlm_of(4) == 55
    spec = DescriptorSpec(n_species=3, r_cut=3.0, n_max=3)
    nl_of, _ = spec.nlm_tables()
    assert K.n_nlm_of(3) == len(nl_of)


def test_no_pairs_and_garbage_offsets():
    """Centres without pairs give zeros; offsets outside [0, P] are clamped; unknown species ignored."""
    tables = K.make_tables(2, 3.0, 2, np.float64)
    d = np.array([[1.0, 0.5, 0.2], [0.3, -1.0, 0.4]])
    species = np.array([0, 7], np.int32)  # species 7 does not exist: ignored
    offsets = np.array([0, 2, 2, 99], np.int32)  # centre 2's run is clamped to [2, 2)
    X, A = run_forward(d, offsets, species, tables)
    assert np.all(X[1:] == 0.0) and np.all(A[1:] == 0.0)
    X1, _ = run_forward(d[:1], np.array([0, 1, 1, 1], np.int32), species[:1], tables)
    np.testing.assert_allclose(X[0], X1[0], rtol=1e-14)
    g = run_vjp(d, offsets, species, tables, A, np.ones_like(X))
    assert np.all(g[1] == 0.0) and np.all(np.isfinite(g))
    t = run_jvp(d, offsets, species, tables, A, np.ones_like(d))
    assert np.all(t[1:] == 0.0)
