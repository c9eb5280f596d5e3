"""Tests of neuralil_fast.datagen: EAN geometry, box packing, GFN2-xTB labels,
the seeded sampling pipeline, the make-data command and the bundled data set."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from neuralil_fast.datagen import ean

TBLITE_REASON = "tblite is not installed (pip install neuralil_fast[data])"
DATA_DIR = Path(__file__).resolve().parents[1] / "neuralil_fast" / "data"
BUNDLED = DATA_DIR / "ean_xtb.xyz"


# --- geometry ------------------------------------------------------------------

def _bonds(atoms, cutoff=1.6):
    d = atoms.get_all_distances()
    n = len(atoms)
    return {(i, j): d[i, j] for i in range(n) for j in range(i + 1, n) if d[i, j] < cutoff}


def test_ethylammonium_geometry():
    cat = ean.ethylammonium()
    assert cat.get_chemical_symbols() == list("NHHHCHHCHHH")
    assert cat.get_chemical_formula() == "C2H8N"
    expected = {(0, 1): "N-H", (0, 2): "N-H", (0, 3): "N-H", (0, 4): "C-N",
                (4, 5): "C-H", (4, 6): "C-H", (4, 7): "C-C",
                (7, 8): "C-H", (7, 9): "C-H", (7, 10): "C-H"}
    bonds = _bonds(cat)
    assert set(bonds) == set(expected)  # exactly the intended bonds, nothing else close
    for pair, kind in expected.items():
        assert bonds[pair] == pytest.approx(ean.BOND[kind], abs=1e-10)
    tet = ean.TETRAHEDRAL
    for a, b, c in [(1, 0, 2), (1, 0, 4), (0, 4, 7), (5, 4, 6), (0, 4, 5), (8, 7, 9), (4, 7, 10)]:
        assert cat.get_angle(a, b, c) == pytest.approx(tet, abs=1e-8)
    # staggered: H-N-C-C and H-C-C-N anti dihedrals are 180 degrees
    assert cat.get_dihedral(1, 0, 4, 7) == pytest.approx(180.0, abs=1e-8)
    assert cat.get_dihedral(8, 7, 4, 0) == pytest.approx(180.0, abs=1e-8)
    np.testing.assert_allclose(cat.get_center_of_mass(), 0.0, atol=1e-12)
    # all non-bonded intramolecular distances are comfortably long
    d = cat.get_all_distances()
    nonbonded = [d[i, j] for i in range(11) for j in range(i + 1, 11) if (i, j) not in expected]
    assert min(nonbonded) > 1.6


def test_nitrate_geometry():
    an = ean.nitrate()
    assert an.get_chemical_symbols() == list("NOOO")
    d = an.get_all_distances()
    np.testing.assert_allclose(d[0, 1:], ean.BOND["N-O"], atol=1e-12)
    for a, c in [(1, 2), (2, 3), (1, 3)]:
        assert an.get_angle(a, 0, c) == pytest.approx(120.0, abs=1e-8)
    # planar: the four atoms span a plane only
    assert np.linalg.matrix_rank(an.positions - an.positions[0], tol=1e-8) == 2


def test_place_atom_internal_coordinates():
    rng = np.random.default_rng(5)
    a, b, c = rng.normal(size=(3, 3))
    d = ean.place_atom(a, b, c, 1.3, 104.0, -47.0)
    from ase import Atoms
    at = Atoms("X4", positions=[a, b, c, d])
    assert at.get_distance(2, 3) == pytest.approx(1.3, abs=1e-12)
    assert at.get_angle(1, 2, 3) == pytest.approx(104.0, abs=1e-9)
    assert at.get_dihedral(0, 1, 2, 3) == pytest.approx(-47.0 % 360.0, abs=1e-9)


def test_random_rotation_is_proper_orthogonal():
    rng = np.random.default_rng(1)
    for _ in range(20):
        r = ean.random_rotation(rng)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n_pairs,seed", [(1, 0), (2, 1), (4, 2), (4, 3), (8, 4)])
def test_packed_box_density_order_and_no_overlap(n_pairs, seed):
    box = ean.pack_box(n_pairs, np.random.default_rng(seed))
    assert len(box) == 15 * n_pairs
    assert box.get_chemical_symbols() == (list("NHHHCHHCHHH") * n_pairs + list("NOOO") * n_pairs)
    assert box.pbc.all()
    cell = box.cell.array
    np.testing.assert_allclose(cell, np.eye(3) * cell[0, 0], atol=0)  # cubic
    amu_per_a3_to_g_per_cm3 = 1.66053906660
    density = box.get_masses().sum() / box.get_volume() * amu_per_a3_to_g_per_cm3
    assert density == pytest.approx(1.21, rel=1e-6)
    # 108.1 g/mol per ion pair at 1.21 g/cm^3 gives about 148 Å^3 per pair
    assert box.get_volume() / n_pairs == pytest.approx(148.35, rel=2e-3)
    # no intermolecular overlap (minimum image): heavy-heavy > 1.7 Å, with H > 1.2 Å
    mol = ean.molecule_ids(n_pairs)
    assert ean.min_intermolecular_margin(box, mol) > 0.0
    # independent check with ASE's minimum-image distances
    d = box.get_all_distances(mic=True)
    heavy = box.numbers > 1
    other = mol[:, None] != mol[None, :]
    assert d[other & heavy[:, None] & heavy[None, :]].min() > 1.7
    assert d[other].min() > 1.2
    # the ions are rigid copies of the templates
    cat, an = ean.ethylammonium(), ean.nitrate()
    for m in range(n_pairs):
        idx = np.flatnonzero(mol == m)
        np.testing.assert_allclose(np.sort(box[idx].get_all_distances().ravel()),
                                   np.sort(cat.get_all_distances().ravel()), atol=1e-10)
        idx = np.flatnonzero(mol == n_pairs + m)
        np.testing.assert_allclose(np.sort(box[idx].get_all_distances().ravel()),
                                   np.sort(an.get_all_distances().ravel()), atol=1e-10)


def test_packing_is_seeded():
    a = ean.pack_box(4, np.random.default_rng(11))
    b = ean.pack_box(4, np.random.default_rng(11))
    c = ean.pack_box(4, np.random.default_rng(12))
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions, c.positions)


def test_box_length_for_four_pairs():
    assert ean.box_length(4) == pytest.approx(8.40, abs=0.01)
    assert ean.box_length(8) == pytest.approx(10.59, abs=0.01)


@pytest.mark.parametrize("option, value, message", [
    ("--timestep", "0", "timestep_fs"),
    ("--accuracy", "0", "accuracy"),  # tblite's SCF would not converge
    ("--rattle-std", "-0.1", "rattle_std"),
    ("--max-strain", "0.4", "max_strain"),
    ("--jobs", "0", "--jobs"),
    ("--temperatures", "300,nan", "temperatures"),
    ("--n-configs", "0", "n_configs"),
])
def test_make_data_rejects_bad_settings(tmp_path, capsys, option, value, message):
    """Clear errors before any xTB call (and before tblite is even needed)."""
    from neuralil_fast.cli import main

    try:
        rc = main(["make-data", "--out", str(tmp_path / "d.xyz"), "--no-progress",
                   option, value])
    except SystemExit as exit_:  # argparse's own check of the temperature list
        rc = exit_.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --- tblite --------------------------------------------------------------------

def test_missing_tblite_message(monkeypatch):
    from neuralil_fast.datagen import label
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    with pytest.raises(ImportError, match=r"pip install neuralil_fast\[data\]"):
        label.make_calculator()


@pytest.mark.slow
def test_xtb_forces_and_stress_match_finite_differences():
    pytest.importorskip("tblite", reason=TBLITE_REASON)
    from neuralil_fast.datagen import label
    label.set_threads(1)
    box = ean.pack_box(1, np.random.default_rng(3))
    calc = label.make_calculator(cache_api=False)  # the accuracy used for the data (0.1)

    # forces of an isolated ion pair (cheap) against central differences of the energy
    cluster = box.copy()
    cluster.pbc = False
    cluster.cell = None
    ref = label.compute(cluster, calc)
    assert "stress" not in ref
    h = 1e-3
    for i in (0, 1, 4, 7, 11, 12):  # N, H(N), C, C, N(O3), O
        for k in range(3):
            plus, minus = cluster.copy(), cluster.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            fd = -(label.compute(plus, calc)["energy"] - label.compute(minus, calc)["energy"]) / (2 * h)
            assert fd == pytest.approx(ref["forces"][i, k], abs=2e-4)

    # one stress component of the periodic box against a finite strain
    ref = label.compute(box, calc)
    assert ref["stress"].shape == (6,)
    eps = 1e-4
    energies = []
    for s in (eps, -eps):
        strained = box.copy()
        strained.set_cell(box.cell.array @ np.diag([1.0 + s, 1.0, 1.0]), scale_atoms=True)
        energies.append(label.compute(strained, calc)["energy"])
    sxx = (energies[0] - energies[1]) / (2 * eps) / box.get_volume()
    assert sxx == pytest.approx(ref["stress"][0], abs=1e-5)


# --- the sampling pipeline -----------------------------------------------------

TINY = dict(n_pairs=1, temperatures=(450.0,), relax_steps=0, equil_steps=0, sample_every=1,
            n_rattle=1, n_strain=1)
TINY_ARGS = ["--n-pairs", "1", "--temperatures", "450", "--relax-steps", "0",
             "--equil-steps", "0", "--sample-every", "1", "--n-rattle", "1", "--n-strain", "1"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two in-memory runs with seed 7 and one run of the command with seed 8
    (1 ion pair, 4 and 3 frames: about 14 small xTB calls in all)."""
    pytest.importorskip("tblite", reason=TBLITE_REASON)
    import ase.io
    from neuralil_fast.cli import main
    from neuralil_fast.datagen.generate import GeneratorConfig, generate

    out = tmp_path_factory.mktemp("make-data") / "tiny.xyz"
    rc = main(["make-data", "--out", str(out), "--n-configs", "3", "--seed", "8",
               "--no-progress", *TINY_ARGS])
    return {
        "a": generate(GeneratorConfig(n_configs=4, seed=7, **TINY)),
        "b": generate(GeneratorConfig(n_configs=4, seed=7, **TINY)),
        "rc": rc, "out": out,
        "c": ase.io.read(out, index=":") if rc == 0 else None,
    }


def _same(f, g):
    return (np.array_equal(f.numbers, g.numbers) and np.array_equal(f.positions, g.positions)
            and np.array_equal(f.cell.array, g.cell.array)
            and f.get_potential_energy() == g.get_potential_energy()
            and np.array_equal(f.get_forces(), g.get_forces())
            and np.array_equal(f.get_stress(), g.get_stress()))


@pytest.mark.slow
def test_generator_same_seed_identical(tiny_runs):
    a, b = tiny_runs["a"], tiny_runs["b"]
    assert len(a) == len(b) == 4
    assert [f.info["kind"] for f in a] == ["md", "rattle", "strain", "md"]
    for f, g in zip(a, b):
        assert _same(f, g)
        assert f.info.keys() == g.info.keys()
        assert all(np.array_equal(f.info[k], g.info[k]) for k in f.info)


@pytest.mark.slow
def test_make_data_command_and_different_seed(tiny_runs):
    assert tiny_runs["rc"] == 0
    a, c = tiny_runs["a"], tiny_runs["c"]
    assert [f.info["kind"] for f in c] == ["md", "rattle", "strain"]
    for f, g in zip(a, c):
        assert not np.allclose(f.positions, g.positions)
        assert f.get_potential_energy() != pytest.approx(g.get_potential_energy(), abs=1e-3)
        assert g.get_forces().shape == (15, 3) and g.get_stress().shape == (6,)
        assert g.info["seed"] == 8
    meta = json.loads(tiny_runs["out"].with_suffix(".json").read_text())
    assert meta["n_frames"] == 3 and meta["seed"] == 8
    assert meta["versions"]["tblite"] not in ("", "not installed")
    assert meta["force_std_eV_per_A"] > 0


@pytest.mark.slow
def test_generator_frames_and_provenance(tiny_runs):
    frames = tiny_runs["a"]
    md, rattle, strain = frames[0], frames[1], frames[2]
    for f in frames:
        assert len(f) == 15 and f.pbc.all()
        assert f.get_forces().shape == (15, 3)
        assert np.isfinite(f.get_potential_energy())
        assert f.get_stress().shape == (6,)
        assert f.info["method"] == "GFN2-xTB"
        assert f.info["seed"] == 7
        assert f.info["temperature"] == 450.0
        assert f.info["gen_n_pairs"] == 1
        assert f.info["tblite_version"] not in ("", "not installed")
        assert "momenta" not in f.arrays
    assert [f.info["frame"] for f in frames] == [0, 1, 2, 3]
    assert rattle.info["parent"] == 0 and strain.info["parent"] == 0
    # the strained copy has a deformed cell of the same atoms, within ±3 %
    ratio = np.linalg.solve(md.cell.array, strain.cell.array)
    assert np.abs(ratio - np.eye(3)).max() <= 0.03 + 1e-12
    assert not np.allclose(ratio, np.eye(3))
    # the rattled copy moved every atom by a small amount
    delta = rattle.positions - md.positions
    delta -= np.round(delta @ np.linalg.inv(md.cell.array)) @ md.cell.array
    assert 0.0 < np.abs(delta).max() < 0.5


# --- the bundled data set --------------------------------------------------------

@pytest.fixture(scope="module")
def bundled():
    import ase.io
    if not BUNDLED.exists():
        pytest.fail(f"bundled data set {BUNDLED} is missing")
    return ase.io.read(BUNDLED, index=":")


def test_bundled_dataset(bundled):
    assert BUNDLED.stat().st_size < 10_000_000
    assert len(bundled) >= 300
    for f in bundled:
        assert len(f) == 60
        assert f.pbc.all()
        assert sorted(set(f.get_chemical_symbols())) == ["C", "H", "N", "O"]
        assert f.get_chemical_symbols() == list("NHHHCHHCHHH") * 4 + list("NOOO") * 4
        assert np.isfinite(f.get_potential_energy())
        forces = f.get_forces()
        assert forces.shape == (60, 3) and np.isfinite(forces).all()
        assert f.get_stress().shape == (6,)
        assert f.info["method"] == "GFN2-xTB"
        assert f.info["kind"] in ("md", "rattle", "strain")
    kinds = {f.info["kind"] for f in bundled}
    assert kinds == {"md", "rattle", "strain"}
    energies = np.array([f.get_potential_energy() for f in bundled])
    assert energies.std() > 0.1  # not one configuration repeated
    forces = np.concatenate([f.get_forces().ravel() for f in bundled])
    assert 0.1 < forces.std() < 10.0


def test_bundled_provenance(bundled):
    meta = json.loads((DATA_DIR / "ean_xtb.json").read_text())
    assert meta["n_frames"] == len(bundled)
    assert meta["method"].startswith("GFN2-xTB")
    for key in ("command", "seed", "versions", "wall_time_s", "force_std_eV_per_A", "generator"):
        assert key in meta
    forces = np.concatenate([f.get_forces().ravel() for f in bundled])
    assert meta["force_std_eV_per_A"] == pytest.approx(forces.std(), rel=1e-6)
