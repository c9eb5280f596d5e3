"""neuralil_fast.geometry: widths, wrapping, validation (oracles: brute-force geometry)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from neuralil_fast import geometry
from neuralil_fast.geometry import (
    as_system,
    check_cell,
    check_positions,
    perpendicular_widths,
    species_indices,
    validate_cutoff,
    wrap_positions,
)


def cell_from_parameters(a, b, c, alpha, beta, gamma):
    """Rows a, b, c of a triclinic cell from lengths and angles (degrees)."""
    al, be, ga = np.radians([alpha, beta, gamma])
    va = np.array([a, 0.0, 0.0])
    vb = np.array([b * np.cos(ga), b * np.sin(ga), 0.0])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz2 = c * c - cx * cx - cy * cy
    return np.array([va, vb, [cx, cy, np.sqrt(max(cz2, 0.0))]])


@st.composite
def triclinic_cells(draw, min_len=1.0, max_len=10.0):
    a, b, c = (draw(st.floats(min_len, max_len)) for _ in range(3))
    angles = [draw(st.floats(40.0, 140.0)) for _ in range(3)]
    cell = cell_from_parameters(a, b, c, *angles)
    # Drop nearly degenerate angle combinations (the volume must stay sizeable).
    assume(np.isfinite(cell).all())
    assume(abs(np.linalg.det(cell)) > 0.05 * a * b * c)
    # A random rotation, so that no vector is aligned with the axes.
    q, _ = np.linalg.qr(np.asarray(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
                        + 3 * np.eye(3))
    return cell @ q.T


def brute_force_widths(cell):
    """Distance between the two planes spanned by (a_j, a_k) through 0 and through a_i,
    by explicit projection on the unit normal (constructed by Gram-Schmidt, not a cross product)."""
    out = []
    for i in range(3):
        j, k = [m for m in range(3) if m != i]
        e1 = cell[j] / np.linalg.norm(cell[j])
        v = cell[k] - (cell[k] @ e1) * e1
        e2 = v / np.linalg.norm(v)
        w = cell[i] - (cell[i] @ e1) * e1 - (cell[i] @ e2) * e2
        out.append(np.linalg.norm(w))
    return np.array(out)


@given(triclinic_cells())
def test_perpendicular_widths_match_plane_distance(cell):
    np.testing.assert_allclose(perpendicular_widths(cell), brute_force_widths(cell), rtol=1e-10)


def test_perpendicular_widths_simple_cases():
    np.testing.assert_allclose(perpendicular_widths(np.diag([2.0, 3.0, 4.0])), [2.0, 3.0, 4.0])
    # A sheared cell: a = (4,0,0), b = (2,3,0), c = (0,0,5): widths 3, 4*3/5 ... computed by hand
    cell = np.array([[4.0, 0, 0], [2.0, 3.0, 0], [0, 0, 5.0]])
    # width along a: distance of a from the plane (b, c): |a x? | -> plane normal ∝ (3, -2, 0)/sqrt(13)
    np.testing.assert_allclose(perpendicular_widths(cell), [12 / np.sqrt(13), 3.0, 5.0])


@given(
    triclinic_cells(),
    st.lists(st.tuples(*[st.floats(-3.0, 4.0)] * 3), min_size=1, max_size=8),
    st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_wrap_positions(cell, frac, pbc):
    pbc = np.array(pbc)
    frac = np.array(frac)
    positions = frac @ cell
    wrapped = wrap_positions(positions, cell, pbc)
    assert wrapped.shape == positions.shape
    tol = 1e-9
    # Oracle: coordinates along the periodic vectors of the projection onto their span
    # (independent of how the open directions are completed); all periodic -> plain fractions.
    periodic = cell[pbc]

    def periodic_coords(x):
        if len(periodic) == 0:
            return np.zeros((len(x), 0))
        coef, *_ = np.linalg.lstsq(periodic.T, x.T, rcond=None)
        return coef.T

    new_frac = periodic_coords(wrapped)
    assert np.all(new_frac >= -tol)
    assert np.all(new_frac < 1.0 + tol)
    # wrapped - original is an integer combination of the periodic lattice vectors
    diff = wrapped - positions
    k = periodic_coords(diff)
    np.testing.assert_allclose(k, np.round(k), atol=1e-8)
    np.testing.assert_allclose(np.round(k) @ periodic if len(periodic) else 0 * diff, diff, atol=1e-8)
    if not pbc.any():
        np.testing.assert_array_equal(wrapped, positions)


def test_wrap_positions_half_open_and_open_zero_vector():
    cell = np.diag([2.0, 2.0, 0.0])  # third direction open with a zero vector
    pbc = [True, True, False]
    pos = np.array([[2.0, -1e-20, 7.0], [-2.0, 4.0, -3.0], [1.0, -0.5, 0.0]])
    w = wrap_positions(pos, cell, pbc)
    assert np.all(w[:, :2] >= 0.0) and np.all(w[:, :2] < 2.0)
    np.testing.assert_array_equal(w[:, 2], pos[:, 2])
    np.testing.assert_allclose(w[2], [1.0, 1.5, 0.0])
    # No periodic direction: unchanged copy.
    w0 = wrap_positions(pos, np.zeros((3, 3)), False)
    np.testing.assert_array_equal(w0, pos)


def test_wrap_positions_beyond_moves_only_far_atoms():
    cell = np.array([[5.0, 0.0, 0.0], [1.0, 6.0, 0.0], [0.5, -0.7, 7.0]])
    pbc = np.array([True, True, False])
    rng = np.random.default_rng(4)
    frac = rng.uniform(-0.5, 1.5, (6, 3))
    frac[1, 0] += 40.0   # far along a
    frac[2, 1] -= 7.0    # far along b
    frac[4, 0] += 3.0    # within 4 cells: left alone
    pos = frac @ cell
    pos[3, 2] += 700.0   # far along the open direction (normal to a and b): left alone
    got = wrap_positions(pos, cell, pbc, beyond=4)
    full = wrap_positions(pos, cell, pbc)
    np.testing.assert_array_equal(got[[1, 2]], full[[1, 2]])
    np.testing.assert_array_equal(got[[0, 3, 4, 5]], pos[[0, 3, 4, 5]])
    near = pos[[0, 4, 5]]  # no atom far: the bound skips the solve
    np.testing.assert_array_equal(wrap_positions(near, cell, pbc, beyond=4), near)


@pytest.mark.parametrize("seed", range(4))
def test_wrap_positions_beyond_against_fractional_coordinates(seed):
    """Atoms spread over +-7 cells of a skewed cell: wrapped exactly when |floor(f)| > 3."""
    rng = np.random.default_rng(seed)
    cell = np.diag([4.0, 5.0, 6.0]) + rng.uniform(-1.5, 1.5, (3, 3))
    pbc = np.array([True, True, True])
    pos = rng.uniform(-7, 7, (50, 3)) * rng.uniform(0, 1, (50, 1)) @ cell
    frac = np.linalg.solve(cell.T, pos.T).T
    far = (np.abs(np.floor(frac)) > 3).any(axis=1)
    got = wrap_positions(pos, cell, pbc, beyond=3)
    np.testing.assert_array_equal(got[far], wrap_positions(pos, cell, pbc)[far])
    np.testing.assert_array_equal(got[~far], pos[~far])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_positions_rejected(bad):
    pos = np.zeros((3, 3))
    pos[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf"):
        check_positions(pos)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        as_system(positions=pos, cell=np.eye(3) * 5, pbc=True)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        wrap_positions(pos, np.eye(3) * 5, True)


def test_bad_position_shape_rejected():
    with pytest.raises(ValueError, match=r"shape"):
        check_positions(np.zeros((4, 2)))


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (np.zeros((3, 3)), True),
        (np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]), True),  # parallel a, b
        (np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]), True),  # coplanar
        (np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0.0]]), [False, True, True]),  # zero periodic c
        (np.array([[1.0, 0, 0], [3.0, 0, 0], [0, 0, 0.0]]), [True, True, False]),  # parallel periodic
    ],
)
def test_singular_cell_rejected(cell, pbc):
    with pytest.raises(ValueError, match=r"singular"):
        check_cell(cell, pbc)
    with pytest.raises(ValueError, match=r"singular"):
        as_system(positions=np.zeros((1, 3)), cell=cell, pbc=pbc)


def test_open_direction_may_have_zero_vector():
    cell, pbc = check_cell(np.array([[3.0, 0, 0], [0, 0, 0], [0, 0, 0]]), [True, False, False])
    assert pbc.tolist() == [True, False, False]
    cell, pbc = check_cell(np.zeros((3, 3)), False)
    assert not pbc.any()


def test_nonfinite_cell_rejected():
    with pytest.raises(ValueError, match=r"cell contains NaN"):
        check_cell(np.diag([1.0, np.nan, 1.0]), True)


@pytest.mark.parametrize("r_cut", [0.0, -1.0, np.nan, np.inf])
def test_bad_cutoff_rejected(r_cut):
    with pytest.raises(ValueError, match=r"r_cut must be a positive"):
        validate_cutoff(r_cut)


def test_species_indices():
    np.testing.assert_array_equal(species_indices([6, 1, 7, 8, 1], ("C", "H", "N", "O")), [0, 1, 2, 3, 1])
    with pytest.raises(ValueError, match=r"unknown species \['Fe', 'S'\]"):
        species_indices([6, 26, 16, 26], ("C", "H", "N", "O"))


def test_numbers_length_mismatch_rejected():
    with pytest.raises(ValueError, match=r"atomic numbers"):
        as_system(positions=np.zeros((3, 3)), numbers=[1, 1])


def test_as_system_from_atoms():
    import ase

    atoms = ase.Atoms("H2O", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=[4, 5, 6], pbc=[1, 0, 1])
    s = as_system(atoms)
    assert s.n_atoms == 3
    np.testing.assert_array_equal(s.numbers, [1, 1, 8])
    np.testing.assert_array_equal(s.pbc, [True, False, True])
    np.testing.assert_array_equal(s.cell, np.diag([4.0, 5.0, 6.0]))


def test_complete_cell_spans_space():
    # Internal helper used by wrapping and neighbour search: every pbc pattern with
    # zero open vectors must give a non-singular completed cell.
    a = np.array([[2.0, 0.3, 0.1], [0.5, 3.0, -0.2], [0.2, -0.4, 2.5]])
    for pbc in itertools.product([False, True], repeat=3):
        pbc = np.array(pbc)
        cell = np.where(pbc[:, None], a, 0.0)
        full = geometry._complete_cell(cell, pbc)
        assert abs(np.linalg.det(full)) > 1e-3
        np.testing.assert_array_equal(full[pbc], a[pbc])
