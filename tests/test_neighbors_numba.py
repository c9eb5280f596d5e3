"""Tests of the numba cell-list neighbour search against ASE.

Every hypothesis case compares the (i, j, S) set with
``ase.neighborlist.neighbor_list("ijS", atoms, r_cut)`` exactly (both sorted
lexicographically).  float32 inputs are compared with ASE run on the same
float32-rounded values (cast to float64), which is what the kernel computes.
"""

import numpy as np
import pytest

ase = pytest.importorskip("ase")
from ase.geometry import cellpar_to_cell  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import neuralil_fast.kernels.cpu.neighbors as nbm_module  # noqa: E402
from neuralil_fast.kernels.cpu.neighbors import (  # noqa: E402
    ERR_CELL,
    ERR_NONFINITE,
    ERR_RCUT,
    count_and_fill,
    neighbor_pairs_numba,
)

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- helpers
def _rows(i, j, S):
    a = np.column_stack(
        [np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(S, np.int64)]
    ).reshape(-1, 5)
    return a[np.lexsort(a.T[::-1])]


def ase_pairs(positions, cell, pbc, r_cut):
    atoms = ase.Atoms(
        positions=np.asarray(positions, np.float64), cell=cell, pbc=pbc
    )
    return neighbor_list("ijS", atoms, float(r_cut))


def assert_same_pairs(got, ref, positions, cell, r_cut):
    """(i, j, S) sets must be equal.

    The only tolerated differences are pairs whose distance is within 1e-12
    (relative to the coordinate scale) of r_cut: ASE evaluates distances with
    ``complete_cell(cell)``, which for a cell with two zero rows is rebuilt by
    an SVD and can move a periodic vector by one ulp, flipping an exact tie
    (found by hypothesis: |a| == r_cut == 1.25).  Everything else, including
    exact ties in ordinary cells (see test_lattice_exact_ties), is exact.
    """
    got = _rows(*got)
    ref = _rows(*ref)
    if got.shape == ref.shape and np.array_equal(got, ref):
        return len(got)
    gs = {tuple(r) for r in got.tolist()}
    rs = {tuple(r) for r in ref.tolist()}
    assert len(gs) == len(got), "duplicate pairs"
    diff = np.array(sorted(gs ^ rs), np.int64).reshape(-1, 5)
    pos = np.asarray(positions, np.float64)
    off = diff[:, 2:] @ np.asarray(cell, np.float64)
    d = np.linalg.norm(pos[diff[:, 1]] - pos[diff[:, 0]] + off, axis=1)
    scale = max(r_cut, np.abs(pos).max(initial=0.0), np.abs(off).max(initial=0.0))
    ties = np.abs(d - r_cut) <= 1e-12 * scale
    if not ties.all():
        raise AssertionError(
            f"mismatch: {len(got)} pairs vs ASE {len(ref)}; "
            f"missing {sorted(rs - gs)[:5]}, extra {sorted(gs - rs)[:5]}"
        )
    return len(got)


def check_against_ase(positions, cell, pbc, r_cut):
    i, j, S = neighbor_pairs_numba(positions, cell, pbc, r_cut)
    n = len(positions)
    assert i.dtype == np.int32 and j.dtype == np.int32 and S.dtype == np.int32
    assert S.shape == (len(i), 3)
    # CSR order: sorted by centre
    assert np.all(np.diff(i) >= 0)
    if len(i):
        assert i.min() >= 0 and i.max() < n and j.min() >= 0 and j.max() < n
    # no shifts along open directions
    for c in range(3):
        if not pbc[c]:
            assert np.all(S[:, c] == 0)
    # float32 input: the kernel works on the float32 values promoted to
    # float64, so ASE gets exactly those values
    pos64 = np.asarray(positions).astype(np.float64)
    ref = ase_pairs(pos64, cell, pbc, r_cut)
    return assert_same_pairs((i, j, S), ref, pos64, cell, r_cut)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


@st.composite
def cells(draw, min_len=1.0, max_len=12.0):
    """Triclinic cells, angles 40..140 degrees, randomly rotated."""
    lengths = [draw(st.floats(min_len, max_len)) for _ in range(3)]
    angles = [draw(st.floats(40.0, 140.0)) for _ in range(3)]
    a, b, g = angles
    # a valid parallelepiped needs each angle < sum of the others, sum < 360
    assume(a + b + g < 355 and a < b + g - 5 and b < a + g - 5 and g < a + b - 5)
    cell = cellpar_to_cell(lengths + angles)
    vol = abs(np.linalg.det(cell))
    assume(vol > 0.05 * np.prod(lengths))
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        cell = cell @ random_rotation(rng).T
    return cell


@st.composite
def systems(draw, max_atoms=40, max_pairs=30000):
    cell = draw(cells())
    pbc = np.array([draw(st.booleans()) for _ in range(3)])
    n = draw(st.integers(1, max_atoms))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lo = draw(st.sampled_from([0.0, -0.5, -2.0]))  # atoms outside the cell
    frac = rng.uniform(lo, 1.0 - lo, size=(n, 3))
    positions = frac @ cell
    # duplicate positions (distance exactly 0)
    if n > 1 and draw(st.booleans()):
        k = draw(st.integers(1, max(1, n // 3)))
        src = rng.integers(0, n, size=k)
        dst = rng.integers(0, n, size=k)
        positions[dst] = positions[src]
    # keep the number of pairs manageable for ASE (thin cells -> many images)
    vol = abs(np.linalg.det(cell))
    r_max = (max_pairs * vol / (4.19 * n * n)) ** (1 / 3)
    r_cut = min(draw(st.floats(0.3, 6.0)), max(r_max, 0.05))
    # open directions may carry a zero cell vector (ASE completes it)
    cell = cell.copy()
    for c in range(3):
        if not pbc[c] and draw(st.booleans()):
            cell[c] = 0.0
    return positions, cell, pbc, r_cut


# ------------------------------------------------------ hypothesis vs ASE
@settings(max_examples=500, **SETTINGS)
@given(systems())
def test_random_systems_float64(system):
    positions, cell, pbc, r_cut = system
    check_against_ase(positions, cell, pbc, r_cut)


@settings(max_examples=200, **SETTINGS)
@given(systems())
def test_random_systems_float32(system):
    positions, cell, pbc, r_cut = system
    check_against_ase(positions.astype(np.float32), cell, pbc, r_cut)


@settings(max_examples=150, **SETTINGS)
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    r_cut=st.floats(0.5, 8.0),
    spread=st.floats(0.0, 30.0),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_fully_open_zero_cell(n, seed, r_cut, spread, dtype):
    rng = np.random.default_rng(seed)
    positions = (rng.normal(size=(n, 3)) * spread + 1000.0 * rng.normal(size=3))
    positions = positions.astype(dtype)
    check_against_ase(positions, np.zeros((3, 3)), np.zeros(3, bool), r_cut)


@settings(max_examples=150, **SETTINGS)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    spacing=st.sampled_from([0.5, 1.0, 1.5]),
    r_cut=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]),
    pbc=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    dup=st.booleans(),
)
def test_lattice_exact_ties(shape, spacing, r_cut, pbc, dup):
    """Simple-cubic grids: many distances are EXACTLY r_cut (excluded)."""
    grid = np.stack(
        np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1
    ).reshape(-1, 3)
    positions = grid * spacing
    if dup:
        positions = np.concatenate([positions, positions[:2]])
    cell = np.diag(np.array(shape, float) * spacing)
    check_against_ase(positions, cell, np.array(pbc), r_cut)


@settings(max_examples=6, **SETTINGS)
@given(
    n=st.integers(1000, 5000),
    seed=st.integers(0, 2**32 - 1),
    r_cut=st.sampled_from([3.5, 5.0]),
    angles=st.tuples(*[st.floats(60.0, 120.0)] * 3),
    pbc=st.sampled_from([(True, True, True), (True, True, False),
                         (False, True, False)]),
)
def test_large_ean_density(n, seed, r_cut, angles, pbc):
    assume(sum(angles) < 340 and max(angles) < sum(angles) - max(angles) - 10)
    rng = np.random.default_rng(seed)
    cell = cellpar_to_cell([1.0, 1.0, 1.0, *angles])
    cell *= (n / 0.1 / abs(np.linalg.det(cell))) ** (1 / 3)
    positions = rng.uniform(-0.2, 1.2, size=(n, 3)) @ cell
    npairs = check_against_ase(positions, cell, np.array(pbc), r_cut)
    assert npairs > 0


# --------------------------------------------------------- special cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_self_image_and_duplicates(dtype):
    # a single atom in a thin cell sees its own images; duplicates are kept
    positions = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [5.0, 5.0, 5.0]],
                         dtype)
    cell = np.diag([1.0, 20.0, 20.0])
    pbc = np.array([True, True, True])
    n = check_against_ase(positions, cell, pbc, 2.5)
    i, j, S = neighbor_pairs_numba(positions, cell, pbc, 2.5)
    assert np.any((i == j) & np.any(S != 0, axis=1))
    assert np.any((i == 0) & (j == 1) & np.all(S == 0, axis=1))
    assert n > 0


def test_empty_and_single():
    i, j, S = neighbor_pairs_numba(np.zeros((0, 3)), np.eye(3), True, 2.0)
    assert len(i) == 0 and S.shape == (0, 3)
    i, j, S = neighbor_pairs_numba(np.zeros((1, 3)), np.zeros((3, 3)), False, 2.0)
    assert len(i) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overflow_and_reallocate(dtype):
    rng = np.random.default_rng(0)
    cell = cellpar_to_cell([9.0, 10.0, 11.0, 70.0, 100.0, 110.0])
    positions = (rng.uniform(-0.3, 1.3, size=(200, 3)) @ cell).astype(dtype)
    pbc = np.array([True, False, True])
    r_cut = 3.5
    ref = neighbor_pairs_numba(positions, cell, pbc, r_cut)
    n_true = len(ref[0])
    assert n_true > 100
    for cap in [0, 1, 37, n_true - 1]:
        ci = np.full(cap, -7, np.int32)
        cj = np.full(cap, -7, np.int32)
        cs = np.full((cap, 3), -7, np.int32)
        n = count_and_fill(positions, cell, pbc, r_cut, cap, ci, cj, cs)
        assert n == n_true  # true count even though it did not fit
        # what was written is the prefix of the exact CSR list
        np.testing.assert_array_equal(ci, ref[0][:cap])
        np.testing.assert_array_equal(cj, ref[1][:cap])
        np.testing.assert_array_equal(cs, ref[2][:cap])
        # caller reallocates with the returned count
        ci = np.empty(n, np.int32)
        cj = np.empty(n, np.int32)
        cs = np.empty((n, 3), np.int32)
        assert count_and_fill(positions, cell, pbc, r_cut, n, ci, cj, cs) == n
        np.testing.assert_array_equal(ci, ref[0])
        np.testing.assert_array_equal(cj, ref[1])
        np.testing.assert_array_equal(cs, ref[2])
    # larger capacity: padding with centre = neighbour = N, shift 0
    cap = n_true + 50
    ci = np.full(cap, -7, np.int32)
    cj = np.full(cap, -7, np.int32)
    cs = np.full((cap, 3), -7, np.int32)
    assert count_and_fill(positions, cell, pbc, r_cut, cap, ci, cj, cs) == n_true
    np.testing.assert_array_equal(ci[:n_true], ref[0])
    assert np.all(ci[n_true:] == 200) and np.all(cj[n_true:] == 200)
    assert np.all(cs[n_true:] == 0)


@pytest.mark.parametrize(
    "positions, cell, pbc, r_cut, match",
    [
        ([[0, 0, 0], [np.nan, 0, 0]], np.eye(3) * 5, True, 2.0, "NaN or inf"),
        ([[0, 0, 0], [np.inf, 0, 0]], np.zeros((3, 3)), False, 2.0, "NaN or inf"),
        ([[0, 0, 0]], np.zeros((3, 3)), True, 2.0, "singular"),
        ([[0, 0, 0]], [[1, 0, 0], [2, 0, 0], [0, 0, 1]], True, 2.0, "singular"),
        ([[0, 0, 0]], [[1, 0, 0], [2, 0, 0], [0, 0, 0]], [True, True, False],
         2.0, "singular"),
        ([[0, 0, 0]], [[0, 0, 0], [0, 1, 0], [0, 0, 1]], [True, False, False],
         2.0, "singular"),
        ([[0, 0, 0]], [[1, 0, 0], [0, 1, 0], [1, 1, 0]], True, 2.0, "singular"),
        ([[0, 0, 0]], np.eye(3) * 5, True, 0.0, "r_cut"),
        ([[0, 0, 0]], np.eye(3) * 5, True, -1.0, "r_cut"),
        ([[0, 0, 0]], np.eye(3) * 5, True, np.nan, "r_cut"),
        ([[0, 0, 0]], np.eye(3) * 5, True, "abc", "r_cut"),
        ([[0, 0]], np.eye(3) * 5, True, 1.0, "shape"),
        ([[0, 0, 0]], np.eye(3) * 1e-4, True, 20.0, "too thin"),
    ],
)
def test_bad_input(positions, cell, pbc, r_cut, match):
    with pytest.raises(ValueError, match=match):
        neighbor_pairs_numba(np.asarray(positions, float), cell, pbc, r_cut)


def test_error_codes_from_njit_core():
    buf_i = np.empty(4, np.int32)
    buf_j = np.empty(4, np.int32)
    buf_s = np.empty((4, 3), np.int32)
    pos = np.array([[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]])
    pbc = np.ones(3, bool)
    assert count_and_fill(pos, np.eye(3), pbc, 1.0, 4, buf_i, buf_j, buf_s) \
        == ERR_NONFINITE
    pos = np.zeros((2, 3))
    assert count_and_fill(pos, np.zeros((3, 3)), pbc, 1.0, 4, buf_i, buf_j,
                          buf_s) == ERR_CELL
    assert count_and_fill(pos, np.eye(3), pbc, 0.0, 4, buf_i, buf_j, buf_s) \
        == ERR_RCUT


def test_open_direction_ignores_cell_row():
    rng = np.random.default_rng(3)
    positions = rng.uniform(-5, 15, size=(100, 3))
    pbc = np.array([True, False, True])
    cell_a = np.array([[10.0, 0, 0], [0, 10.0, 0], [2.0, 0, 9.0]])
    cell_b = cell_a.copy()
    cell_b[1] = [3.0, 0.0, 0.0]  # junk row along the open direction
    a = _rows(*neighbor_pairs_numba(positions, cell_a, pbc, 4.0))
    b = _rows(*neighbor_pairs_numba(positions, cell_b, pbc, 4.0))
    assert np.array_equal(a, b)
    check_against_ase(positions, cell_a, pbc, 4.0)


def test_mmap_output_path(monkeypatch):
    """Large outputs come from an anonymous mmap: same result, writeable."""
    monkeypatch.setattr(nbm_module, "_MMAP_MIN_BYTES", 0)
    rng = np.random.default_rng(5)
    cell = cellpar_to_cell([12.0, 13.0, 14.0, 80.0, 95.0, 105.0])
    positions = rng.uniform(0, 1, size=(300, 3)) @ cell
    i, j, S = neighbor_pairs_numba(positions, cell, True, 4.0)
    assert i.flags.writeable and S.shape == (len(i), 3)
    check_against_ase(positions, cell, np.array([True] * 3), 4.0)
    ref = ase_pairs(positions, cell, [True] * 3, 4.0)
    assert_same_pairs((i, j, S), ref, positions, cell, 4.0)


def _address(a):
    return a.__array_interface__["data"][0]


def test_mmap_output_recycled_only_when_idle(monkeypatch):
    """Large output buffers are reused only after every array (and view) from them died."""
    import gc

    monkeypatch.setattr(nbm_module, "_MMAP_MIN_BYTES", 0)
    nbm_module.release_output_buffers()
    rng = np.random.default_rng(6)
    cell = np.eye(3) * 11.0
    pbc = np.array([True] * 3)
    pos_a = rng.uniform(0, 11.0, size=(250, 3))
    pos_b = rng.uniform(0, 11.0, size=(200, 3))  # fewer pairs than pos_a
    ref_a = ase_pairs(pos_a, cell, pbc, 4.0)
    ref_b = ase_pairs(pos_b, cell, pbc, 4.0)

    a = neighbor_pairs_numba(pos_a, cell, pbc, 4.0)
    keep_a = tuple(x.copy() for x in a)
    addr_x = _address(a[0])
    view = a[2][5:9]  # a view alone keeps the buffer busy
    del a
    gc.collect()
    b = neighbor_pairs_numba(pos_b, cell, pbc, 4.0)
    addr_y = _address(b[0])
    assert addr_y != addr_x
    assert np.array_equal(view, keep_a[2][5:9])  # not overwritten by the second build
    assert_same_pairs(b, ref_b, pos_b, cell, 4.0)
    del view
    gc.collect()
    c = neighbor_pairs_numba(pos_a, cell, pbc, 4.0)  # X idle and large enough
    assert _address(c[0]) == addr_x
    for x, y in zip(c, keep_a):
        assert np.array_equal(x, y)
    d = neighbor_pairs_numba(pos_b, cell, pbc, 4.0)  # X and Y busy: a third buffer
    for old in (b, c):
        assert not any(np.shares_memory(x, y) for x in old for y in d)
    assert_same_pairs(b, ref_b, pos_b, cell, 4.0)
    assert_same_pairs(c, ref_a, pos_a, cell, 4.0)
    assert_same_pairs(d, ref_b, pos_b, cell, 4.0)
    assert len(nbm_module._pool) == nbm_module._POOL_SIZE
    del b
    gc.collect()
    e = neighbor_pairs_numba(pos_b, cell, pbc, 4.0)  # Y idle again
    assert _address(e[0]) == addr_y
    assert_same_pairs(e, ref_b, pos_b, cell, 4.0)
    del c, d, e
    gc.collect()

    # rebinding in a loop (the old list alive while the new one is built): two buffers
    pairs = neighbor_pairs_numba(pos_a, cell, pbc, 4.0)
    seen = set()
    for _ in range(4):
        pairs = neighbor_pairs_numba(pos_a, cell, pbc, 4.0)
        seen.add(_address(pairs[0]))
        assert_same_pairs(pairs, ref_a, pos_a, cell, 4.0)
    assert len(seen) == 2
    del pairs
    nbm_module.release_output_buffers()
    assert not nbm_module._pool


# ------------------------------------------------------ Triton version
def _triton_env():
    """(torch, triton neighbour module) or skip with the reason."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install torch==2.13.0, the CPU build)")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    import torch

    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET", "1") != "1":
            pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
        # must be set before triton is first imported in this process
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import triton  # noqa: F401
        from triton.runtime import interpreter  # noqa: F401
    from neuralil_fast.kernels.gpu import neighbors as gnl

    return torch, gnl


def _triton_device(torch):
    return "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=6, **SETTINGS)
@given(systems(max_atoms=8, max_pairs=300),
       st.sampled_from([np.float64, np.float32]))
def test_triton_matches_ase(system, dtype):
    torch, gnl = _triton_env()
    positions, cell, pbc, r_cut = system
    positions = positions.astype(dtype)
    # the interpreter runs ~27 interpreted bin visits per centre: keep cells
    # at least ~r_cut thick so that the number of images stays small
    assume(min(1.0 / np.linalg.norm(np.linalg.inv(cell if np.linalg.det(cell) else
                                                  np.eye(3)), axis=0)) > 0.5 * r_cut
           or not pbc.any())
    x = torch.tensor(positions, device=_triton_device(torch))
    i, j, S = gnl.neighbor_pairs_triton(x, cell, pbc, r_cut)
    i, j, S = i.cpu().numpy(), j.cpu().numpy(), S.cpu().numpy()
    assert np.all(np.diff(i) >= 0)
    pos64 = positions.astype(np.float64)
    ref = ase_pairs(pos64, cell, pbc, r_cut)
    assert_same_pairs((i, j, S), ref, pos64, cell, r_cut)


def test_triton_overflow_padding_and_errors():
    torch, gnl = _triton_env()
    dev = _triton_device(torch)
    rng = np.random.default_rng(11)
    cell = cellpar_to_cell([6.0, 6.5, 7.0, 75.0, 95.0, 105.0])
    positions = rng.uniform(-0.2, 1.2, size=(8, 3)) @ cell
    pbc = np.array([True, True, False])
    ref = neighbor_pairs_numba(positions, cell, pbc, 3.0)
    n_true = len(ref[0])
    x = torch.tensor(positions, device=dev)
    for cap in (5, n_true + 4):
        ci = torch.full((cap,), -7, dtype=torch.int32, device=dev)
        cj = torch.full((cap,), -7, dtype=torch.int32, device=dev)
        cs = torch.full((cap, 3), -7, dtype=torch.int32, device=dev)
        n = gnl.count_and_fill_triton(x, cell, pbc, 3.0, cap, ci, cj, cs)
        assert n == n_true
        m = min(cap, n_true)
        # same CSR runs as the numba list (order inside a run may differ)
        np.testing.assert_array_equal(ci.cpu().numpy()[:m], ref[0][:m])
        if cap > n_true:
            got = _rows(ci.cpu().numpy()[:n], cj.cpu().numpy()[:n], cs.cpu().numpy()[:n])
            assert np.array_equal(got, _rows(*ref))
            assert np.all(ci.cpu().numpy()[n:] == 8) and np.all(cj.cpu().numpy()[n:] == 8)
            assert np.all(cs.cpu().numpy()[n:] == 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = x.clone()
        bad[0, 0] = float("nan")
        gnl.neighbor_pairs_triton(bad, cell, pbc, 3.0)
    with pytest.raises(ValueError, match="singular"):
        gnl.neighbor_pairs_triton(x, np.zeros((3, 3)), True, 3.0)
    with pytest.raises(ValueError, match="r_cut"):
        gnl.neighbor_pairs_triton(x, cell, pbc, -1.0)
    i, j, S = gnl.neighbor_pairs_triton(x[:0], cell, pbc, 3.0)
    assert len(i) == 0
