"""neuralil_fast.descriptors: the element-resolved spherical Bessel power spectrum.

Oracles: a literal numpy double sum written here (ASE neighbour list, scipy radial
functions orthonormalised independently, scipy Legendre polynomials); the two
library forms (Legendre and spherical-harmonic) against each other; symmetry
(rotation, translation, permutation, supercell, image choice); central finite
differences for gradients.
"""
from __future__ import annotations

import math

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.special import eval_legendre

from neuralil_fast.descriptors import (
    DescriptorSpec,
    SphericalBessel,
    descriptors,
    descriptors_legendre,
    descriptors_reference,
)
from neuralil_fast.geometry import species_indices
from neuralil_fast.neighbors import neighbor_pairs, pair_displacements

from conftest import ean_atoms
from test_basis import oracle_g
from test_geometry import cell_from_parameters

EAN_SPECIES = ("C", "H", "N", "O")

desc_sh = jax.jit(descriptors_reference, static_argnums=(0, 4))
desc_leg = jax.jit(descriptors_legendre, static_argnums=(0, 4, 5))

# --------------------------------------------------------------------------- oracle


def oracle_descriptors(atoms, species, r_c, n_max):
    """The design's §2 double sum, literally, in numpy: (n_atoms, n_features)."""
    i, j, D = neighbor_list("ijD", atoms, r_c)
    d = np.linalg.norm(D, axis=1)
    keep = d > 0
    i, j, D, d = i[keep], j[keep], D[keep], d[keep]
    sym = atoms.get_chemical_symbols()
    sp = np.array([species.index(s) for s in sym], int)
    S = len(species)
    nl = [(n, l) for l in range(n_max + 1) for n in range(n_max - l + 1)]  # l-major
    pairs = [(a, b) for a in range(S) for b in range(a, S)]
    G = oracle_g(n_max, r_c, d) if len(d) else np.zeros((0, len(nl)))
    X = np.zeros((len(atoms), len(pairs), len(nl)))
    for c in range(len(atoms)):
        rows = np.flatnonzero(i == c)
        if len(rows) == 0:
            continue
        U = D[rows] / d[rows, None]
        cos = np.clip(U @ U.T, -1.0, 1.0)
        W = np.eye(S)[sp[j[rows]]]  # (nb, S)
        for k, (n, l) in enumerate(nl):
            ang = (2 * l + 1) / (4 * math.pi) * eval_legendre(l, cos)
            gk = G[rows, k]
            M = np.outer(gk, gk) * ang
            P = W.T @ M @ W  # (S, S): sum_{j in a, k in b}
            for q, (a, b) in enumerate(pairs):
                X[c, q, k] = P[a, b]
    return X.reshape(len(atoms), -1)


# --------------------------------------------------------------------------- helpers


def pair_inputs(atoms, species, r_cut, pad_to=None):
    """Library pairs as (displacements float64 numpy, centers int32, neighbour species int32)."""
    i, j, S = neighbor_pairs(atoms, r_cut, backend="reference")
    pos = atoms.get_positions()
    D = pos[j] + S @ np.asarray(atoms.get_cell()) - pos[i]
    sp = species_indices(atoms.get_atomic_numbers(), species)[j]
    n = len(atoms)
    if pad_to is not None and pad_to > len(i):
        pad = pad_to - len(i)
        D = np.vstack([D, np.zeros((pad, 3))])
        i = np.concatenate([i, np.full(pad, n)])
        sp = np.concatenate([sp, np.zeros(pad, int)])
    return D, i.astype(np.int32), sp.astype(np.int32)


def max_neighbors(centers, n_atoms):
    c = centers[centers < n_atoms]
    return int(np.bincount(c, minlength=n_atoms).max()) if len(c) else 1


def both_forms(spec, D, c, sp, n):
    X1 = np.asarray(desc_sh(spec, jnp.asarray(D), jnp.asarray(c), jnp.asarray(sp), n))
    X2 = np.asarray(desc_leg(spec, jnp.asarray(D), jnp.asarray(c), jnp.asarray(sp), n,
                             max_neighbors(c, n)))
    return X1, X2


def assert_close_rel(a, b, rtol, what=""):
    scale = max(np.abs(b).max(), 1e-300)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def compute(atoms, species=EAN_SPECIES, r_cut=3.5, n_max=4, pad_multiple=1024):
    """Descriptors through the library's pairs and the jitted spherical-harmonic form.

    Pair arrays are padded to a multiple of ``pad_multiple`` so that configurations of
    one system share a compilation (SphericalBessel.compute, eager, is checked separately).
    """
    spec = DescriptorSpec(len(species), float(r_cut), int(n_max))
    n_pairs = len(neighbor_pairs(atoms, r_cut, backend="reference")[0])
    pad = -(-(n_pairs + 1) // pad_multiple) * pad_multiple
    D, c, sp = pair_inputs(atoms, species, r_cut, pad_to=pad)
    return np.asarray(desc_sh(spec, jnp.asarray(D), jnp.asarray(c), jnp.asarray(sp), len(atoms)))


def random_orthogonal(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if rng.uniform() < 0.5:
        q[:, 0] = -q[:, 0]  # include improper rotations (descriptors are O(3)-invariant)
    return q


def small_triclinic(seed=0, n=5, symbols=("H", "C", "O"), lengths=(3.1, 3.6, 4.0), angles=(70, 110, 95)):
    rng = np.random.default_rng(seed)
    cell = cell_from_parameters(*lengths, *angles)
    frac = rng.uniform(-0.2, 1.2, size=(n, 3))
    syms = [symbols[k % len(symbols)] for k in range(n)]
    return ase.Atoms(syms, positions=frac @ cell, cell=cell, pbc=True)


@pytest.fixture(scope="module")
def ean0_X():
    with jax.enable_x64(True):
        return compute(ean_atoms(0))


# --------------------------------------------------------------------------- values


@pytest.mark.shared
def test_ean_shape_and_oracle(x64, ean, ean0_X):
    atoms = ean(0)
    sb = SphericalBessel(species=EAN_SPECIES, r_cut=3.5, n_max=4)
    assert sb.n_features == 150 and sb.spec.n_features == 150
    X = sb.compute(atoms, backend="reference")
    assert X.shape == (225, 150) and X.dtype == np.float64
    np.testing.assert_allclose(X, ean0_X, rtol=1e-13, atol=1e-13 * np.abs(X).max())
    assert np.isfinite(X).all()
    assert_close_rel(X, oracle_descriptors(atoms, EAN_SPECIES, 3.5, 4), 1e-9, "vs numpy oracle")
    # Structure: the (C, C) block of a nitrate O is empty within 3.5 Å? Not necessarily; but
    # every atom has H neighbours within 3.5 Å in EAN, so the (H, H) block is non-zero.
    hh = 4 + 3 + 2 + 1  # offset of pair (1, 1) = index 4
    assert np.all(X[:, 4 * 15] > 0), "p^{HH}_{00} is a sum of squares with neighbours present"
    del hh


@pytest.mark.shared
@pytest.mark.parametrize("index", [0, 17, 41])
def test_ean_legendre_equals_spherical_harmonics(x64, ean, index):
    atoms = ean(index)
    spec = DescriptorSpec(4, 3.5, 4)
    D, c, sp = pair_inputs(atoms, EAN_SPECIES, 3.5, pad_to=4608)  # same shapes: one compile
    X1, X2 = both_forms(spec, D, c, sp, len(atoms))
    assert X1.shape == (225, 150)
    np.testing.assert_allclose(X1, X2, rtol=1e-12, atol=1e-12 * np.abs(X2).max())


@st.composite
def random_periodic(draw):
    n_species = draw(st.integers(1, 3))
    species = ("H", "C", "O")[:n_species]
    n = draw(st.integers(1, 6))
    lengths = [draw(st.floats(2.0, 6.0)) for _ in range(3)]
    angles = [draw(st.floats(40.0, 140.0)) for _ in range(3)]
    cell = cell_from_parameters(*lengths, *angles)
    assume(np.isfinite(cell).all() and abs(np.linalg.det(cell)) > 0.2 * np.prod(lengths))
    frac = np.array(draw(st.lists(st.tuples(*[st.floats(-0.5, 1.5)] * 3), min_size=n, max_size=n)))
    syms = [species[draw(st.integers(0, n_species - 1))] for _ in range(n)]
    r_cut = draw(st.floats(1.5, 4.0))
    n_max = draw(st.integers(0, 5))
    return ase.Atoms(syms, positions=frac @ cell, cell=cell, pbc=True), species, r_cut, n_max


@settings(max_examples=8)
@given(random_periodic())
def test_random_cells_both_forms_and_oracle(case):
    atoms, species, r_cut, n_max = case
    with jax.enable_x64(True):
        # keep away from pairs within rounding of r_cut (the oracle's list could differ)
        d = neighbor_list("d", atoms, r_cut * 1.001)
        assume(np.all(np.abs(d - r_cut) > 1e-9))
        spec = DescriptorSpec(len(species), r_cut, n_max)
        D, c, sp = pair_inputs(atoms, species, r_cut)
        X1, X2 = both_forms(spec, D, c, sp, len(atoms))
        assert X1.shape == (len(atoms), spec.n_features)
        assert spec.n_features == len(species) * (len(species) + 1) // 2 * (n_max + 1) * (n_max + 2) // 2
        np.testing.assert_allclose(X1, X2, rtol=1e-12, atol=1e-12 * max(np.abs(X2).max(), 1e-300))
        ref = oracle_descriptors(atoms, species, r_cut, n_max)
        np.testing.assert_allclose(X1, ref, rtol=1e-8, atol=1e-9 * max(np.abs(ref).max(), 1e-300))


def test_small_thin_cell_vs_oracle(x64):
    """r_cut beyond half the cell's widths: every periodic image counts (not minimum image)."""
    atoms = small_triclinic(1, n=4, lengths=(2.2, 2.6, 3.0))
    species = ("H", "C", "O")
    X = SphericalBessel(species=species, r_cut=3.5, n_max=3).compute(atoms, backend="reference")
    ref = oracle_descriptors(atoms, species, 3.5, 3)
    assert_close_rel(X, ref, 1e-9)


# --------------------------------------------------------------------------- invariances


@pytest.mark.shared
def test_rotation_invariance(x64, ean0_X):
    atoms = ean_atoms(0)
    q = random_orthogonal(np.random.default_rng(1))
    rot = atoms.copy()
    rot.set_cell(atoms.get_cell()[:] @ q.T, scale_atoms=False)
    rot.set_positions(atoms.get_positions() @ q.T)
    assert_close_rel(compute(rot), ean0_X, 1e-11)


@pytest.mark.shared
def test_translation_invariance(x64, ean0_X):
    atoms = ean_atoms(0)
    moved = atoms.copy()
    moved.translate([1.234, -7.5, 31.0])
    assert_close_rel(compute(moved), ean0_X, 1e-11)


@pytest.mark.shared
def test_permutation_equivariance(x64, ean0_X):
    atoms = ean_atoms(0)
    rng = np.random.default_rng(2)
    sym = np.array(atoms.get_chemical_symbols())
    perm = np.arange(len(atoms))
    for s in set(sym):
        idx = np.flatnonzero(sym == s)
        perm[idx] = rng.permutation(idx)
    assert not np.all(perm == np.arange(len(atoms)))
    permuted = atoms[perm]
    assert permuted.get_chemical_symbols() == list(sym)
    np.testing.assert_allclose(compute(permuted), ean0_X[perm], rtol=1e-12, atol=1e-12 * np.abs(ean0_X).max())


@pytest.mark.shared
def test_image_choice(x64, ean0_X):
    atoms = ean_atoms(0)
    rng = np.random.default_rng(3)
    shifts = rng.integers(-2, 3, size=(len(atoms), 3))
    moved = atoms.copy()
    moved.set_positions(atoms.get_positions() + shifts @ atoms.get_cell()[:])
    assert_close_rel(compute(moved), ean0_X, 1e-11)
    wrapped = atoms.copy()
    wrapped.wrap()
    assert_close_rel(compute(wrapped), ean0_X, 1e-11)


def test_supercell_tiles(x64):
    atoms = small_triclinic(4, n=5)
    species = ("H", "C", "O")
    X = compute(atoms, species, 3.5, 3)
    big = atoms.repeat(2)
    Xb = compute(big, species, 3.5, 3)
    assert Xb.shape == (8 * len(atoms), X.shape[1])
    assert_close_rel(Xb, np.tile(X, (8, 1)), 1e-11)
    # a random rotation of the same triclinic cell changes nothing either
    q = random_orthogonal(np.random.default_rng(9))
    rot = atoms.copy()
    rot.set_cell(atoms.get_cell()[:] @ q.T, scale_atoms=False)
    rot.set_positions(atoms.get_positions() @ q.T)
    assert_close_rel(compute(rot, species, 3.5, 3), X, 1e-11)


@pytest.mark.shared
def test_ean_supercell_tiles(x64, ean0_X):
    atoms = ean_atoms(0).repeat((1, 2, 1))
    Xb = compute(atoms)
    assert_close_rel(Xb, np.tile(ean0_X, (2, 1)), 1e-11)


# --------------------------------------------------------------------------- gradients


def energy_fn(spec, pairs, species_of_neighbor, n_atoms, w):
    """A scalar, nonlinear function of the descriptors of (positions, cell)."""
    i, j, S = pairs

    def E(positions, cell):
        d = pair_displacements(positions, cell, i, j, S)
        X = descriptors_reference(spec, d, i, species_of_neighbor, n_atoms)
        return jnp.sum(w * jnp.tanh(X)) + 0.1 * jnp.sum(X**2)

    return E


def setup_energy(atoms, species, r_cut, n_max, margin=0.5, dtype=jnp.float64, seed=0):
    """Pairs fixed from r_cut + margin: still valid for every small displacement."""
    i, j, S = neighbor_pairs(atoms, r_cut + margin, backend="reference")
    sp = species_indices(atoms.get_atomic_numbers(), species)
    spec = DescriptorSpec(len(species), r_cut, n_max)
    w = np.random.default_rng(seed).normal(size=(len(atoms), spec.n_features))
    pairs = (jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32), jnp.asarray(S, jnp.int32))
    E = energy_fn(spec, pairs, jnp.asarray(sp[j], jnp.int32), len(atoms), jnp.asarray(w, dtype))
    x = jnp.asarray(atoms.get_positions(), dtype)
    c = jnp.asarray(atoms.get_cell()[:], dtype)
    return E, x, c


def central_fd(f, x, index, h):
    e = np.zeros(x.shape)
    e[index] = h
    return (float(f(x + e)) - float(f(x - e))) / (2 * h)


def test_gradients_match_finite_differences_small(x64):
    atoms = small_triclinic(5, n=6)
    E, x, c = setup_energy(atoms, ("H", "C", "O"), 3.0, 3)
    Ej = jax.jit(E)
    gx, gc = jax.jit(jax.grad(E, argnums=(0, 1)))(x, c)
    h = 1e-5
    fx = np.array([[central_fd(lambda y: Ej(y, c), x, (a, k), h) for k in range(3)] for a in range(len(atoms))])
    fc = np.array([[central_fd(lambda y: Ej(x, y), c, (a, k), h) for k in range(3)] for a in range(3)])
    np.testing.assert_allclose(np.asarray(gx), fx, rtol=1e-6, atol=1e-7 * np.abs(fx).max())
    np.testing.assert_allclose(np.asarray(gc), fc, rtol=1e-6, atol=1e-7 * np.abs(fc).max())
    assert np.abs(fx).max() > 0 and np.abs(fc).max() > 0
    # translation invariance of the gradient: forces sum to zero
    np.testing.assert_allclose(np.asarray(gx).sum(axis=0), 0.0, atol=1e-10 * np.abs(fx).max())
    # jit agrees with eager
    np.testing.assert_allclose(float(Ej(x, c)), float(E(x, c)), rtol=1e-13)


@pytest.mark.shared
def test_gradients_match_finite_differences_ean(x64):
    atoms = ean_atoms(0)
    E, x, c = setup_energy(atoms, EAN_SPECIES, 3.5, 4)
    Ej = jax.jit(E)
    gx, gc = jax.jit(jax.grad(E, argnums=(0, 1)))(x, c)
    rng = np.random.default_rng(0)
    h = 1e-5
    for a in rng.choice(len(atoms), 4, replace=False):
        for k in range(3):
            fd = central_fd(lambda y: Ej(y, c), x, (a, k), h)
            np.testing.assert_allclose(float(gx[a, k]), fd, rtol=1e-6, atol=1e-7 * np.abs(gx).max())
    for (a, k) in [(0, 0), (1, 1), (2, 2), (0, 1), (2, 0)]:
        fd = central_fd(lambda y: Ej(x, y), c, (a, k), h)
        np.testing.assert_allclose(float(gc[a, k]), fd, rtol=1e-6, atol=1e-7 * np.abs(gc).max())


def test_check_grads_positions_and_cell(x64):
    atoms = small_triclinic(6, n=4)
    E, x, c = setup_energy(atoms, ("H", "C", "O"), 3.0, 2)
    check_grads(jax.jit(E), (x, c), order=1, modes=("fwd", "rev"), eps=1e-5)


def test_float32_gradient_matches_float64(x64):
    atoms = small_triclinic(7, n=5)
    E64, x64_, c64 = setup_energy(atoms, ("H", "C", "O"), 3.0, 2)
    g64 = jax.jit(jax.grad(E64, argnums=(0, 1)))(x64_, c64)
    with jax.enable_x64(False):
        E32, x32, c32 = setup_energy(atoms, ("H", "C", "O"), 3.0, 2, dtype=jnp.float32)
        assert x32.dtype == jnp.float32
        v32 = jax.jit(E32)(x32, c32)
        g32 = jax.jit(jax.grad(E32, argnums=(0, 1)))(x32, c32)
        assert v32.dtype == jnp.float32 and g32[0].dtype == jnp.float32
        g32 = [np.asarray(g) for g in g32]
    v64 = float(jax.jit(E64)(x64_, c64))
    np.testing.assert_allclose(float(v32), v64, rtol=1e-4)
    for a, b in zip(g32, g64):
        np.testing.assert_allclose(a, np.asarray(b), rtol=2e-3, atol=2e-4 * np.abs(np.asarray(b)).max())


def edge_case_pairs(r_cut):
    """Four atoms and explicit pairs: 0-1 exactly at r_cut (both ways), 0-2 at 1e-7 Å
    (both ways), ordinary ones, two padding rows (centre == n_atoms)."""
    positions = np.array([[0.0, 0.0, 0.0], [r_cut, 0.0, 0.0], [1e-7, 0.0, 0.0], [0.5, 1.0, -0.7]])
    centers = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4])
    neigh = np.array([1, 2, 3, 0, 0, 3, 2, 4, 4])
    shifts = np.zeros((len(centers), 3), int)
    return positions, centers, neigh, shifts


def edge_case_setup(dtype):
    r_cut = 3.5
    positions, centers, neigh, shifts = edge_case_pairs(r_cut)
    n = len(positions)
    d_exact = positions[neigh[:2]] - positions[0]
    assert np.linalg.norm(d_exact[0]) == r_cut and np.linalg.norm(d_exact[1]) == 1e-7
    spec = DescriptorSpec(2, r_cut, 2)
    sp = jnp.asarray(np.array([0, 1, 1, 0, 0])[neigh], jnp.int32)  # species of neighbours
    c_ = jnp.asarray(centers, jnp.int32)
    j_ = jnp.asarray(neigh, jnp.int32)
    S_ = jnp.asarray(shifts, jnp.int32)
    cell = jnp.asarray(np.eye(3) * 10.0, dtype)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(n, spec.n_features)), dtype)

    def X_of(x, cell):
        d = pair_displacements(x, cell, c_, j_, S_)
        return descriptors_reference(spec, d, c_, sp, n)

    def E(x, cell):
        return jnp.sum(w * X_of(x, cell))

    return spec, positions, centers, neigh, (c_, j_, S_, sp), cell, w, X_of, E


def test_no_nan_eager_edge_cases():
    """Op-by-op with debug_nans: no intermediate NaN/inf at r = r_cut, r = 1e-7, padding.

    float32 only (the dtype where under/overflow is likeliest; op-by-op is slow); the
    jitted test below covers both dtypes (debug_nans then checks the outputs).
    """
    dtype = jnp.float32
    spec, positions, centers, neigh, _, cell, w, X_of, E = edge_case_setup(dtype)
    x = jnp.asarray(positions, dtype)
    X = X_of(x, cell)
    gx, gc = jax.grad(E, argnums=(0, 1))(x, cell)
    for a in (X, gx, gc):
        assert a.dtype == dtype
        assert np.isfinite(np.asarray(a)).all()


def test_no_nan_at_cutoff_zero_and_padding(dtype, tol):
    spec, positions, centers, neigh, (c_, j_, S_, sp), cell, w, X_of, E = edge_case_setup(dtype)
    n = len(positions)
    f_val, f_grad = jax.jit(X_of), jax.jit(jax.grad(E, argnums=(0, 1)))
    x = jnp.asarray(positions, dtype)
    X = f_val(x, cell)
    gx, gc = f_grad(x, cell)
    assert X.dtype == dtype and gx.dtype == dtype
    for a in (X, gx, gc):
        assert np.isfinite(np.asarray(a)).all()
    # forward-mode too
    jf = jax.jit(jax.jacfwd(E))(x, cell)
    assert np.isfinite(np.asarray(jf)).all()
    np.testing.assert_allclose(np.asarray(jf), np.asarray(gx), rtol=tol["rtol"],
                               atol=tol["rtol"] * np.abs(np.asarray(gx)).max())
    # gradients w.r.t. the displacements directly (padding rows included)
    d = pair_displacements(x, cell, c_, j_, S_)
    gd = jax.jit(jax.grad(lambda d: jnp.sum(w * descriptors_reference(spec, d, c_, sp, n))))(d)
    assert np.isfinite(np.asarray(gd)).all()
    gd = np.asarray(gd)
    np.testing.assert_array_equal(gd[centers == n], 0.0)  # padding rows
    np.testing.assert_array_equal(gd[[0, 3]], 0.0)  # pairs at exactly r_cut contribute nothing
    # The pair at r_cut contributes nothing to the values: drop it and compare
    keep = np.arange(len(centers)) != 0
    c2, j2 = jnp.asarray(centers[keep], jnp.int32), jnp.asarray(neigh[keep], jnp.int32)
    d2 = pair_displacements(x, cell, c2, j2, S_[keep])
    X2 = jax.jit(descriptors_reference, static_argnums=(0, 4))(spec, d2, c2, sp[keep], n)
    np.testing.assert_allclose(np.asarray(X), np.asarray(X2), rtol=4 * np.finfo(dtype).eps,
                               atol=4 * np.finfo(dtype).eps * np.abs(np.asarray(X)).max())
    # the pair at 1e-7: a regular contribution, continuous as r -> 0+
    x_b = np.array(positions)
    x_b[2, 0] = 2e-7
    X_b = np.asarray(f_val(jnp.asarray(x_b, dtype), cell))
    np.testing.assert_allclose(X_b, np.asarray(X), rtol=tol["rtol"] * 10,
                               atol=1e-5 * np.abs(np.asarray(X)).max())


def test_pair_at_zero_distance_ignored(dtype):
    """Two atoms on top of each other: the pair has r = 0 and is not a neighbour."""
    spec = DescriptorSpec(1, 3.0, 2)
    x = jnp.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.5, 0.2]], dtype)
    c = jnp.asarray([0, 0, 1, 1], jnp.int32)
    j = jnp.asarray([1, 2, 0, 2], jnp.int32)
    S = jnp.zeros((4, 3), jnp.int32)
    cell = jnp.eye(3, dtype=dtype) * 8

    def E(x):
        d = pair_displacements(x, cell, c, j, S)
        return jnp.sum(descriptors_reference(spec, d, c, jnp.zeros(4, jnp.int32), 3) ** 2)

    g = jax.jit(jax.grad(E))(x)
    assert np.isfinite(np.asarray(g)).all()
    X = jax.jit(lambda x: descriptors_reference(spec, pair_displacements(x, cell, c, j, S), c,
                                                jnp.zeros(4, jnp.int32), 3))(x)
    # atom 0 and atom 1 see only atom 2 (the r = 0 pair dropped): identical descriptors
    np.testing.assert_array_equal(np.asarray(X[0]), np.asarray(X[1]))


def test_descriptors_dispatch_reference(x64):
    atoms = small_triclinic(8, n=4)
    spec = DescriptorSpec(3, 3.0, 2)
    D, c, sp = pair_inputs(atoms, ("H", "C", "O"), 3.0)
    a = jax.jit(descriptors, static_argnums=(0, 4, 5))(spec, jnp.asarray(D), jnp.asarray(c), jnp.asarray(sp),
                                                       len(atoms), "reference")
    b = desc_sh(spec, jnp.asarray(D), jnp.asarray(c), jnp.asarray(sp), len(atoms))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14, atol=1e-14 * np.abs(np.asarray(b)).max())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_cut=0.0), "r_cut"),
        (dict(r_cut=-1.0), "r_cut"),
        (dict(r_cut=float("nan")), "r_cut"),
        (dict(n_max=-1), "n_max"),
        (dict(n_max=2.5), "n_max"),
        (dict(species=("H", "H")), "distinct"),
        (dict(species=("H", "Xx")), "Xx"),
    ],
)
def test_spherical_bessel_bad_parameters(kwargs, match):
    args = dict(species=("H", "O"), r_cut=3.0, n_max=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SphericalBessel(**args)


@pytest.mark.parametrize(
    "args, match",
    [((2, 0.0, 2), "r_cut"), ((2, 3.0, -1), "n_max"), ((0, 3.0, 2), "species")],
)
def test_descriptor_spec_bad_parameters(args, match):
    with pytest.raises(ValueError, match=match):
        DescriptorSpec(*args)


def test_compute_bad_inputs():
    sb = SphericalBessel(species=("H", "O"), r_cut=3.0, n_max=2)
    good = ase.Atoms("H2O", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=np.eye(3) * 6, pbc=True)
    bad = good.copy()
    bad.positions[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sb.compute(bad, backend="reference")
    singular = good.copy()
    singular.set_cell([[6, 0, 0], [12, 0, 0], [0, 0, 6]], scale_atoms=False)
    with pytest.raises(ValueError, match="singular"):
        sb.compute(singular, backend="reference")
    foreign = ase.Atoms("H2OFe", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 2]],
                        cell=np.eye(3) * 6, pbc=True)
    with pytest.raises(ValueError, match="Fe"):
        sb.compute(foreign, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        sb.compute(good, backend="bogus")
