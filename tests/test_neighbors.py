"""neuralil_fast.neighbors with backend="reference".

Oracles: ``ase.neighborlist.neighbor_list("ijS")`` and a naive all-images enumeration
written here (no wrapping, generous image box).
"""
from __future__ import annotations


import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neuralil_fast import neighbors
from neuralil_fast.neighbors import NeighborList, allocate, neighbor_pairs, update

from test_geometry import cell_from_parameters

# --------------------------------------------------------------------------- oracles


def sort_ijs(i, j, S):
    i, j, S = np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(S, np.int64).reshape(-1, 3)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order]


def ase_pairs(atoms, r_cut):
    return sort_ijs(*neighbor_list("ijS", atoms, r_cut))


def naive_distances(positions, cell, pbc, r_max):
    """All (i, j, S, d) with d < r_max over a generous box of images, no wrapping."""
    pbc = np.asarray(pbc)
    periodic = cell[pbc]
    # orthonormal complement of the periodic span completes the basis
    if len(periodic):
        _, _, vt = np.linalg.svd(periodic)
        comp = vt[len(periodic):]
    else:
        comp = np.eye(3)
    full = cell.copy()
    full[~pbc] = comp
    frac = np.linalg.solve(full.T, positions.T).T
    recip = np.linalg.norm(np.linalg.inv(full), axis=0)  # |b_k|: 1 / width_k
    span = frac.max(axis=0) - frac.min(axis=0)
    K = np.where(pbc, np.ceil(span + r_max * recip).astype(int) + 1, 0)
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in K], indexing="ij"), -1).reshape(-1, 3)
    d = positions[None, None, :, :] + (grid @ cell)[None, :, None, :] - positions[:, None, None, :]
    dist = np.linalg.norm(d, axis=-1)
    i, s, j = np.nonzero(dist < r_max)
    keep = ~((i == j) & np.all(grid[s] == 0, axis=1))
    return i[keep], j[keep], grid[s[keep]], dist[i[keep], s[keep], j[keep]]


def naive_pairs(positions, cell, pbc, r_cut):
    i, j, S, _ = naive_distances(positions, cell, pbc, r_cut)
    return sort_ijs(i, j, S)


def assert_same_pairs(got, ref):
    gi, gj, gS = sort_ijs(*got)
    ri, rj, rS = ref
    assert len(gi) == len(ri), f"{len(gi)} pairs, expected {len(ri)}"
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_array_equal(gj, rj)
    np.testing.assert_array_equal(gS, rS)


# --------------------------------------------------------------------------- strategies


@st.composite
def neighbor_cases(draw, max_atoms=8):
    r_cut = draw(st.floats(0.5, 4.0))
    # Lengths down to a fraction of r_cut: thin cells with several images each way.
    lengths = [draw(st.floats(0.3, 8.0)) for _ in range(3)]
    angles = [draw(st.floats(40.0, 140.0)) for _ in range(3)]
    cell = cell_from_parameters(*lengths, *angles)
    assume(np.isfinite(cell).all() and abs(np.linalg.det(cell)) > 0.1 * np.prod(lengths))
    pbc = np.array([draw(st.booleans()) for _ in range(3)])
    n = draw(st.integers(1, max_atoms))
    # Atoms inside and outside the cell (fractions in [-1.5, 2.5]).
    frac = np.array(draw(st.lists(st.tuples(*[st.floats(-1.5, 2.5)] * 3), min_size=n, max_size=n)))
    positions = frac @ cell
    # Duplicates: some atoms exactly on top of others.
    n_dup = draw(st.integers(0, min(2, n - 1)))
    for k in range(n_dup):
        src = draw(st.integers(0, n - 1))
        positions = np.vstack([positions, positions[src]])
    # Open directions possibly with a zero cell vector.
    cell = cell.copy()
    for k in range(3):
        if not pbc[k] and draw(st.booleans()):
            cell[k] = 0.0
    # Limit the work for very thin cells.
    widths_ok = True
    return positions, cell, pbc, r_cut, widths_ok


def make_atoms(positions, cell, pbc):
    return ase.Atoms(f"H{len(positions)}", positions=positions, cell=cell, pbc=pbc)


@settings(max_examples=150)
@given(neighbor_cases())
def test_reference_pairs_equal_ase(case):
    positions, cell, pbc, r_cut, _ = case
    _, _, _, dist = naive_distances(positions, cell, pbc, r_cut * 1.01 + 1e-6)
    # No exact ties at the cutoff (both sides use a strict '<', but rounding differs).
    assume(np.all(np.abs(dist - r_cut) > 1e-7 * r_cut))
    atoms = make_atoms(positions, cell, pbc)
    ref = ase_pairs(atoms, r_cut)
    # Two oracles must agree with each other first.
    assert_same_pairs(naive_pairs(positions, cell, pbc, r_cut), ref)
    got = neighbor_pairs(atoms, r_cut, backend="reference")
    assert all(isinstance(a, np.ndarray) for a in got)
    # Returned sorted by (i, j, S) already.
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    # The array form gives the same.
    got2 = neighbor_pairs(positions=positions, cell=cell, pbc=pbc, r_cut=r_cut, backend="reference")
    assert_same_pairs(got2, ref)


def test_thin_cell_self_images():
    """One atom in a cell much thinner than r_cut sees many of its own images."""
    cell = np.array([[0.7, 0.0, 0.0], [0.2, 5.0, 0.0], [0.0, 0.0, 0.0]])
    pbc = [True, True, False]
    positions = np.array([[0.1, 0.2, 0.3]])
    r_cut = 2.2
    atoms = make_atoms(positions, cell, pbc)
    i, j, S = neighbor_pairs(atoms, r_cut, backend="reference")
    ref = ase_pairs(atoms, r_cut)
    assert_same_pairs((i, j, S), ref)
    # images along a at |k| * 0.7 < 2.2: k = ±1, ±2, ±3
    assert sorted(S[:, 0].tolist()) == [-3, -2, -1, 1, 2, 3]
    assert np.all(i == 0) and np.all(j == 0) and np.all(S[:, 1:] == 0)


def test_duplicate_positions_are_pairs():
    positions = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    atoms = make_atoms(positions, np.diag([10.0, 10.0, 10.0]), True)
    got = neighbor_pairs(atoms, 1.5, backend="reference")
    assert_same_pairs(got, ase_pairs(atoms, 1.5))
    assert (0, 1) in set(zip(got[0].tolist(), got[1].tolist()))


def test_no_pbc_no_cell():
    rng = np.random.default_rng(3)
    positions = rng.uniform(-3, 3, size=(12, 3))
    atoms = make_atoms(positions, np.zeros((3, 3)), False)
    got = neighbor_pairs(atoms, 2.5, backend="reference")
    assert_same_pairs(got, ase_pairs(atoms, 2.5))
    assert np.all(got[2] == 0)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("n_atoms", [0, 1])
def test_empty_result_single_atom_and_no_atoms(backend, n_atoms):
    atoms = make_atoms(np.zeros((n_atoms, 3)), np.diag([5.0, 5.0, 5.0]), True)
    i, j, S = neighbor_pairs(atoms, 1.0, backend=backend)
    assert len(i) == 0 and len(j) == 0 and S.shape == (0, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_cut=0.0), "r_cut"),
        (dict(r_cut=-2.0), "r_cut"),
        (dict(r_cut=float("nan")), "r_cut"),
        (dict(backend="bogus"), "backend"),
    ],
)
def test_neighbor_pairs_bad_input(kwargs, match):
    atoms = make_atoms(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], np.eye(3) * 4, True)
    kwargs = dict(dict(r_cut=2.0, backend="reference"), **kwargs)
    with pytest.raises(ValueError, match=match):
        neighbor_pairs(atoms, **kwargs)


def test_neighbor_pairs_nan_and_singular():
    pos = np.array([[0.0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        neighbor_pairs(positions=pos, cell=np.eye(3) * 4, pbc=True, r_cut=2.0, backend="reference")
    with pytest.raises(ValueError, match="singular"):
        neighbor_pairs(positions=np.zeros((2, 3)), cell=np.diag([4.0, 4.0, 0.0]), pbc=True, r_cut=2.0,
                       backend="reference")


# --------------------------------------------------------------------------- NeighborList


def valid_rows(nl: NeighborList):
    c = np.asarray(nl.centers)
    n = nl.n_atoms
    v = c < n
    # padding rows carry n_atoms and shift 0 and come after the valid ones
    assert np.all(np.asarray(nl.neighbors)[~v] == n)
    assert np.all(np.asarray(nl.shifts)[~v] == 0)
    assert np.all(np.diff(v.astype(int)) <= 0), "padding must follow the pairs"
    assert np.all(np.diff(c[v]) >= 0), "centres must be sorted (CSR order)"
    return c[v], np.asarray(nl.neighbors)[v], np.asarray(nl.shifts)[v]


def random_system(rng, n=20, box=6.0, pbc=(True, True, True)):
    cell = cell_from_parameters(box, box * 1.1, box * 0.9, 80.0, 100.0, 75.0)
    frac = rng.uniform(0, 1, size=(n, 3))
    return frac @ cell, cell, np.array(pbc)


@pytest.mark.parametrize(
    "pbc, open_vector",
    [
        ((True, True, True), "kept"),
        ((True, False, True), "kept"),
        ((True, False, True), "zero"),
        ((True, False, False), "zero"),
        ((False, True, True), "skewed"),
        ((False, False, False), "zero"),
    ],
)
def test_allocate_then_jit_update(x64, pbc, open_vector):
    rng = np.random.default_rng(11)
    positions, cell, pbc = random_system(rng, pbc=pbc)
    # Open directions carry no images: their lattice vectors may be zero or arbitrary.
    if open_vector == "zero":
        cell[~pbc] = 0.0
    elif open_vector == "skewed":
        cell[~pbc] = [[0.3, 2.0, 1.5]]
    r_cut, skin = 2.5, 0.4
    nl = allocate(positions, cell, pbc, r_cut, skin, backend="reference", capacity_multiplier=2.0)
    assert isinstance(nl, NeighborList) and nl.backend == "reference"
    assert not bool(nl.did_overflow)
    assert_same_pairs(valid_rows(nl), naive_pairs(positions, cell, pbc, r_cut + skin))
    assert int(nl.n_pairs) == len(valid_rows(nl)[0])
    upd = jax.jit(update)
    # large moves (beyond skin/2): a rebuild gives the exact list at the new positions
    for step in range(3):
        positions = positions + rng.normal(scale=0.5, size=positions.shape)
        nl = upd(nl, jnp.asarray(positions))
        assert not bool(nl.did_overflow), "capacity 2x holds for these moves"
        ref = naive_pairs(positions, cell, pbc, r_cut + skin)
        assert_same_pairs(valid_rows(nl), ref)
        assert int(nl.n_pairs) == len(ref[0])
        np.testing.assert_array_equal(np.asarray(nl.reference_positions), positions)
    # the method form
    nl2 = nl.update(jnp.asarray(positions + 0.3))
    assert_same_pairs(valid_rows(nl2), naive_pairs(positions + 0.3, cell, pbc, r_cut + skin))


def test_skin_logic(x64):
    rng = np.random.default_rng(5)
    positions, cell, pbc = random_system(rng, n=16)
    r_cut, skin = 2.0, 0.6
    nl0 = allocate(positions, cell, pbc, r_cut, skin, backend="reference")
    upd = jax.jit(update)
    rows0 = valid_rows(nl0)
    # every atom moves less than skin/2: no rebuild, same arrays and reference positions
    step = rng.normal(size=positions.shape)
    step *= (0.95 * skin / 2) / np.linalg.norm(step, axis=1, keepdims=True)
    moved = positions + step
    nl1 = upd(nl0, jnp.asarray(moved))
    np.testing.assert_array_equal(np.asarray(nl1.reference_positions), positions)
    for a, b in zip(valid_rows(nl1), rows0):
        np.testing.assert_array_equal(a, b)
    # ...and the list still contains every pair within r_cut at the moved positions
    have = set(zip(*[a.tolist() for a in rows0[:2]], map(tuple, rows0[2].tolist())))
    for t in zip(*[a.tolist() for a in naive_pairs(moved, cell, pbc, r_cut)[:2]],
                 map(tuple, naive_pairs(moved, cell, pbc, r_cut)[2].tolist())):
        assert t in have
    # one atom moves beyond skin/2: rebuild
    moved2 = positions.copy()
    moved2[3] += np.array([1.05 * skin / 2, 0.0, 0.0])
    nl2 = upd(nl0, jnp.asarray(moved2))
    np.testing.assert_array_equal(np.asarray(nl2.reference_positions), moved2)
    assert_same_pairs(valid_rows(nl2), naive_pairs(moved2, cell, pbc, r_cut + skin))
    # a cell change also rebuilds
    cell3 = cell * 1.02
    nl3 = upd(nl0, jnp.asarray(positions), jnp.asarray(cell3))
    np.testing.assert_array_equal(np.asarray(nl3.reference_cell), cell3)
    assert_same_pairs(valid_rows(nl3), naive_pairs(positions, cell3, pbc, r_cut + skin))


def compressing(steps: int):
    """A jitted (nl, x, c) -> (nl, x, c): ``steps`` updates, each after scaling x and c
    by 0.98, inside one lax.fori_loop."""
    @jax.jit
    def compress(nl, x, c):
        def body(_, state):
            nl, x, c = state
            x, c = 0.98 * x, 0.98 * c
            return update(nl, x, c), x, c

        return jax.lax.fori_loop(0, steps, body, (nl, x, c))

    return compress


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_overflow_compression_and_reallocate(x64, backend):
    """Compress inside a jitted fori_loop: the flag rises, the host reallocates, and the
    list ends exact (the numba backend rebuilds through its FFI kernel inside jit)."""
    rng = np.random.default_rng(7)
    positions, cell, pbc = random_system(rng, n=24, box=7.0)
    r_cut, skin = 2.0, 0.3
    nl = allocate(positions, cell, pbc, r_cut, skin, backend=backend)
    cap0 = nl.capacity

    compress = compressing(5)
    x, c = jnp.asarray(positions), jnp.asarray(cell)
    overflows = 0
    for chunk in range(5):
        nl, x, c = compress(nl, x, c)
        if bool(nl.did_overflow):
            overflows += 1
            old_cap = nl.capacity
            nl = neighbors.reallocate(nl, np.asarray(x), np.asarray(c))
            assert not bool(nl.did_overflow)
            assert nl.capacity > old_cap
        # after each chunk (reallocated or not) the list is exact for the current state
        assert_same_pairs(valid_rows(nl), naive_pairs(np.asarray(x), np.asarray(c), pbc, r_cut + skin))
    assert overflows >= 1, "compressing by 0.98^25 in volume^(1/3) must overflow the first capacity"
    assert nl.capacity > cap0
    np.testing.assert_allclose(np.asarray(c), cell * 0.98**25)
    # Final check against ASE too.
    xf, cf = np.asarray(x), np.asarray(c)
    assert_same_pairs(valid_rows(nl), ase_pairs(make_atoms(xf, cf, pbc), r_cut + skin))


def test_overflow_when_image_grid_too_small(x64):
    """Ample capacity, but a thin cell compressed until its static image grid is too small:
    the flag must rise (never a silently incomplete list), and reallocation fixes it."""
    rng = np.random.default_rng(8)
    cell = cell_from_parameters(2.0, 6.0, 6.0, 90.0, 90.0, 90.0)
    positions = rng.uniform(0, 1, size=(6, 3)) @ cell
    pbc = np.array([True, True, True])
    r_cut, skin = 2.5, 0.0
    nl = allocate(positions, cell, pbc, r_cut, skin, backend="reference", capacity=20000)
    assert nl.max_images[0] >= 2

    compress = compressing(50)
    nl1, x, c = compress(nl, jnp.asarray(positions), jnp.asarray(cell))
    xf, cf = np.asarray(x), np.asarray(c)
    ref = naive_pairs(xf, cf, pbc, r_cut)
    assert len(ref[0]) < 20000
    # 2.0 * 0.98^50 = 0.73 Å wide: 2.5 Å needs |S_a| = 4 images, the grid holds 3:
    # without the flag the list would be incomplete.
    if not bool(nl1.did_overflow):
        assert_same_pairs(valid_rows(nl1), ref)
    assert bool(nl1.did_overflow)
    nl2 = neighbors.reallocate(nl1, xf, cf)
    assert not bool(nl2.did_overflow) and nl2.max_images[0] > nl.max_images[0]
    assert_same_pairs(valid_rows(nl2), ref)


def test_overflow_is_sticky_and_counts(x64):
    rng = np.random.default_rng(2)
    positions, cell, pbc = random_system(rng, n=12)
    nl = allocate(positions, cell, pbc, 2.0, 0.0, backend="reference", capacity=16)
    true = len(naive_pairs(positions, cell, pbc, 2.0)[0])
    assert true > 16
    assert bool(nl.did_overflow) and int(nl.n_pairs) == true
    nl2 = jax.jit(update)(nl, jnp.asarray(positions * 1.0 + 1e-3))
    assert bool(nl2.did_overflow)
    # with room, no overflow even after a rebuild
    nl3 = allocate(positions, cell, pbc, 2.0, 0.0, backend="reference", capacity=true)
    assert not bool(nl3.did_overflow)
    nl4 = jax.jit(update)(nl3, jnp.asarray(positions + 0.01))
    assert not bool(nl4.did_overflow)


def test_displacements_method(x64):
    rng = np.random.default_rng(4)
    positions, cell, pbc = random_system(rng, n=10)
    nl = allocate(positions, cell, pbc, 2.5, 0.0, backend="reference")
    d = np.asarray(nl.displacements(jnp.asarray(positions), jnp.asarray(cell)))
    c, j, S = valid_rows(nl)
    ref = positions[j] + S @ cell - positions[c]
    np.testing.assert_allclose(d[: len(c)], ref, atol=1e-12)
    np.testing.assert_array_equal(d[len(c):], 0.0)
    assert np.all(np.linalg.norm(ref, axis=1) < 2.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_cut=0.0), "r_cut"),
        (dict(skin=-0.1), "skin"),
        (dict(skin=float("nan")), "skin"),
        (dict(capacity_multiplier=0.5), "capacity_multiplier"),
        (dict(backend="nope"), "backend"),
    ],
)
def test_allocate_bad_input(x64, kwargs, match):
    positions = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    args = dict(r_cut=2.0, skin=0.2, backend="reference")
    args.update(kwargs)
    r_cut = args.pop("r_cut")
    with pytest.raises(ValueError, match=match):
        allocate(positions, np.eye(3) * 5, True, r_cut, **args)


def test_allocate_bad_positions_and_cell(x64):
    with pytest.raises(ValueError, match="NaN"):
        allocate(np.array([[0.0, np.nan, 0]]), np.eye(3) * 5, True, 2.0, backend="reference")
    with pytest.raises(ValueError, match="singular"):
        allocate(np.zeros((2, 3)), np.zeros((3, 3)), True, 2.0, backend="reference")
