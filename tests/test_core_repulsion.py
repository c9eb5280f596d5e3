"""The fixed ZBL core wall (``NeuralIL(core_repulsion=...)``) against independent oracles.

ZBL: a direct numpy transcription of the published universal screening function;
the wall: brute force over all atom pairs (ASE distances); forces and stress: finite
differences; training data: the onset table from ``closest_approach`` leaves every
training configuration's energy and forces exactly as they were.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.data import atomic_numbers
from jax.test_util import check_grads

import neuralil_fast as nf
from conftest import fd_forces, numerical_stress
from neuralil_fast.committee import committee_evaluate_jit, stack
from neuralil_fast.io import Configuration
from neuralil_fast.model import NeuralIL, core_repulsion_energies, load, save, zbl_pair
from neuralil_fast.potential import evaluate_jit
from neuralil_fast.training.data import closest_approach, pad_configurations, take

SPECIES = ("C", "H", "N", "O")


def zbl_numpy(r, z1, z2):
    """ZBL energy (eV) from the published formula (the constants of LAMMPS' pair zbl), float64."""
    a = 0.46850 / (z1**0.23 + z2**0.23)
    x = r / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x)
           + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x))
    return 14.399645 * z1 * z2 / r * phi


def wall_numpy(r, r0, z1, z2, h=1e-6):
    """The shifted wall below r0 (0 above), slope at r0 by a central difference."""
    slope = (zbl_numpy(r0 + h, z1, z2) - zbl_numpy(r0 - h, z1, z2)) / (2 * h)
    v = zbl_numpy(r, z1, z2) - zbl_numpy(r0, z1, z2) - slope * (r - r0)
    return np.where(r < r0, v, 0.0)


def test_zbl_pair_matches_the_formula_and_its_derivative(x64):
    r = jnp.linspace(0.3, 3.0, 40)
    for z1, z2 in ((1, 1), (6, 8), (7, 1)):
        v, dv = zbl_pair(r, float(z1), float(z2))
        np.testing.assert_allclose(v, zbl_numpy(np.asarray(r), z1, z2), rtol=1e-12)
        grad = jax.vmap(jax.grad(lambda x: zbl_pair(x, float(z1), float(z2))[0]))(r)
        np.testing.assert_allclose(dv, grad, rtol=1e-12)
        assert np.all(np.asarray(dv) < 0)      # repulsive everywhere
    check_grads(lambda x: zbl_pair(x, 1.0, 8.0)[0], (r,), order=2, modes=["rev"])


def _dimer_energy(r, onset, s_i, s_j, z, dtype):
    r = jnp.asarray([r, r], dtype)
    sp = jnp.asarray([s_i, s_j], jnp.int32)
    e = core_repulsion_energies(jnp.asarray(onset, dtype), jnp.asarray(z, dtype), r,
                                jnp.ones(2, bool), sp, sp[::-1], jnp.asarray([0, 1]), 2)
    return e


def test_wall_is_zero_beyond_onset_and_smooth_at_it(dtype, tol):
    onset = np.array([[1.4, 1.0], [1.0, 1.3]])
    z = [6.0, 1.0]
    for s_i, s_j in ((0, 1), (1, 1), (0, 0)):
        r0 = onset[s_i, s_j]
        for r in (r0, r0 + 0.01, 2.5):
            assert np.all(np.asarray(_dimer_energy(r, onset, s_i, s_j, z, dtype)) == 0.0)
        for r in (0.5 * r0, 0.8 * r0, 0.99 * r0):
            e = np.asarray(_dimer_energy(r, onset, s_i, s_j, z, dtype), np.float64)
            want = 0.5 * wall_numpy(r, r0, z[s_i], z[s_j])
            # float64: the oracle's slope is a central difference
            np.testing.assert_allclose(e, [want, want], rtol=1e-3 if dtype == jnp.float32
                                       else 1e-7)
            assert want > 0
        # C1 at the onset: the force vanishes there
        f = jax.grad(lambda x: jnp.sum(_dimer_energy(x, onset, s_i, s_j, z, dtype)))
        assert abs(float(f(jnp.asarray(r0 - 1e-3, dtype)))) < 1e-2 * abs(
            float(f(jnp.asarray(0.8 * r0, dtype))))


def _cluster(seed=0):
    """A periodic C/H/N/O box with a few close contacts."""
    rng = np.random.default_rng(seed)
    box = 6.0
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:14]
    pos = (grid + 0.5 + rng.uniform(-0.15, 0.15, grid.shape)) * box / 3
    pos[1] = pos[0] + [0.75, 0.2, 0.0]          # close contacts below any onset used here
    pos[5] = pos[4] + [0.0, 0.0, 0.95]
    symbols = ["H", "H", "C", "N", "O", "H", "C", "O", "N", "H", "C", "H", "O", "N"]
    return Atoms(symbols, positions=pos, cell=np.diag([box, box * 1.04, box * 0.97]), pbc=True)


def _onset_table():
    t = np.full((4, 4), 1.6)
    t[1, 1] = 1.3
    t[0, 1] = t[1, 0] = 1.05
    t[1, 3] = t[3, 1] = 1.4
    return t


def _model(core=True):
    m = NeuralIL(species=SPECIES, r_cut=3.0, n_max=3, widths=(16, 8))
    return dataclasses.replace(m, core_repulsion=_onset_table()) if core else m


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_wall_energy_is_the_brute_force_pair_sum(backend, x64):
    atoms = _cluster()
    params = _model().init(jax.random.key(1), jnp.float64)
    with_wall = nf.Calculator(_model(), params, backend=backend)
    without = nf.Calculator(_model(False), params, backend=backend)
    e1 = with_wall.get_potential_energy(atoms)
    e0 = without.get_potential_energy(atoms)
    dist = atoms.get_all_distances(mic=True)   # every pair is under half the box
    idx = [SPECIES.index(s) for s in atoms.get_chemical_symbols()]
    onset = _onset_table()
    want = 0.0
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            zi = atomic_numbers[atoms[i].symbol]
            zj = atomic_numbers[atoms[j].symbol]
            want += wall_numpy(dist[i, j], onset[idx[i], idx[j]], zi, zj)
    assert want > 1.0
    np.testing.assert_allclose(e1 - e0, want, rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_wall_forces_and_stress_vs_finite_differences(backend, x64):
    model = _model()
    params = model.init(jax.random.key(2), jnp.float64)
    atoms = _cluster()
    atoms.calc = nf.Calculator(model, params, backend=backend)
    forces = atoms.get_forces()
    rows = [0, 1, 4, 5]      # the atoms of the two close contacts
    fd = fd_forces(atoms, lambda: nf.Calculator(model, params, backend=backend), rows)
    np.testing.assert_allclose(forces[rows], fd, rtol=1e-6, atol=1e-6 * np.abs(forces).max())
    np.testing.assert_allclose(atoms.get_stress(),
                               numerical_stress(atoms),
                               rtol=1e-6, atol=1e-6 * np.abs(atoms.get_stress()).max())


def test_committee_path_equals_single_model_path(dtype, tol):
    model = _model()
    atoms = _cluster()
    params = [model.init(jax.random.key(k), dtype) for k in range(2)]
    data = pad_configurations([Configuration(symbols=atoms.get_chemical_symbols(),
                                             positions=atoms.positions, cell=atoms.cell.array,
                                             pbc=True, energy=0.0,
                                             forces=np.zeros((len(atoms), 3)))],
                              SPECIES, model.r_cut, "numba", np.dtype(dtype))
    d = take(data, 0)
    args = [jnp.asarray(a) for a in (d.positions, d.cell, d.species, d.centers, d.neighbors,
                                     d.shifts)]
    out = committee_evaluate_jit(model, stack(params), *args, backend="numba", stress=True)
    for k, p in enumerate(params):
        one = evaluate_jit(model, p, *args, backend="numba")
        for name in ("energy", "forces", "stress"):
            scale = float(jnp.max(jnp.abs(one[name])))
            np.testing.assert_allclose(out[name][k], one[name], rtol=tol["rtol"],
                                       atol=tol["atol"] * scale * 10)


def test_closest_approach_onsets_leave_the_training_data_unchanged(dtype):
    rng = np.random.default_rng(3)
    configs = []
    for seed in range(3):
        atoms = _cluster(seed)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        configs.append(Configuration(symbols=atoms.get_chemical_symbols(),
                                     positions=atoms.positions, cell=atoms.cell.array,
                                     pbc=True, energy=0.0, forces=np.zeros((len(atoms), 3))))
    data = pad_configurations(configs, SPECIES, 3.0, "numba", np.dtype(dtype))
    onset = closest_approach(data, 4, 3.0)
    # the brute-force minimum of each species pair over the three boxes
    want = np.full((4, 4), 3.0)
    for c in configs:
        atoms = Atoms(c.symbols, positions=c.positions, cell=c.cell, pbc=True)
        dist = atoms.get_all_distances(mic=True)
        idx = np.array([SPECIES.index(s) for s in c.symbols])
        for i in range(len(idx)):
            for j in range(len(idx)):
                if i != j:
                    want[idx[i], idx[j]] = min(want[idx[i], idx[j]], dist[i, j])
    np.testing.assert_allclose(onset, want, rtol=1e-6)
    base = _model(False)
    walled = dataclasses.replace(base, core_repulsion=onset)
    params = base.init(jax.random.key(0), dtype)
    for k in range(len(configs)):
        d = take(data, k)
        args = [jnp.asarray(a) for a in (d.positions, d.cell, d.species, d.centers,
                                         d.neighbors, d.shifts)]
        a = evaluate_jit(base, params, *args, backend="numba")
        b = evaluate_jit(walled, params, *args, backend="numba")
        for name in ("energy", "forces", "stress"):
            scale = float(jnp.max(jnp.abs(a[name])))
            # the closest pair sits at the onset: the wall's value and slope are zero there
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5 * max(scale, 1.0))
    # pushed one atom closer than every onset, the wall acts
    squeezed = configs[0].positions.copy()
    squeezed[1] = squeezed[0] + 0.9 * (squeezed[1] - squeezed[0])
    atoms = Atoms(configs[0].symbols, positions=squeezed, cell=configs[0].cell, pbc=True)
    e_walled = nf.Calculator(walled, params, backend="numba").get_potential_energy(atoms)
    e_base = nf.Calculator(base, params, backend="numba").get_potential_energy(atoms)
    assert e_walled - e_base > 0.1


def test_settings_round_trip_and_validation(tmp_path):
    model = _model()
    params = model.init(jax.random.key(0))
    save(tmp_path / "m.nil", model, params)
    loaded, _ = load(tmp_path / "m.nil")
    assert loaded == model and hash(loaded) == hash(model)
    assert np.array_equal(np.asarray(loaded.core_repulsion), _onset_table())
    bad = _onset_table()
    bad[0, 1] = 0.9          # not symmetric
    for table in (bad, np.ones((3, 3)), -_onset_table(), np.full((4, 4), np.nan)):
        with pytest.raises(ValueError, match="core_repulsion"):
            NeuralIL(species=SPECIES, core_repulsion=table)
