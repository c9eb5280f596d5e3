"""JAX-MD adapter: NVE inside jit equals ASE's VelocityVerlet; the overflow loop; NVT runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet

import neuralil_fast as nf

from conftest import initial_momenta, small_system

simulate = pytest.importorskip(
    "jax_md.simulate", reason="jax-md is not installed (optional extra: pip install 'neuralil_fast[md]')")
njm = pytest.importorskip("neuralil_fast.jax_md")

N_STEPS = 100
DT = 0.5 * units.fs


@pytest.fixture(scope="module")
def setup():
    model = nf.NeuralIL(species=("C", "H", "N", "O"), r_cut=3.0, n_max=2, embed_dim=2,
                        widths=(8, 8))
    params = model.init(jax.random.key(0))
    atoms = small_system()
    return model, params, atoms, initial_momenta(atoms)


def _jax_md_nve(model, params, atoms, momenta, n_steps, chunk, capacity=None):
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        sys_ = njm.from_atoms(model, params64, atoms, skin=0.5, backend="reference")
        assert sys_.R.dtype == jnp.float64
        init_fn, apply_fn = simulate.nve(sys_.energy_fn, sys_.shift_fn, DT)
        nbrs = sys_.neighbor_fn.allocate(sys_.R, capacity=capacity)
        state = init_fn(jax.random.key(0), sys_.R, kT=0.0, mass=sys_.mass,
                        momenta=jnp.asarray(momenta), neighbor=nbrs)
        state, nbrs, info = njm.run(apply_fn, state, nbrs, sys_.neighbor_fn, n_steps,
                                    chunk=chunk)
        return np.asarray(state.position), np.asarray(state.momentum), info, nbrs


@pytest.fixture(scope="module")
def ase_trajectory(setup):
    model, params, atoms, momenta = setup
    b = atoms.copy()
    b.set_momenta(momenta)
    b.calc = nf.Calculator(model, params, backend="reference", skin=0.5, dtype="float64")
    # jax-md rounds dt to float32 inside velocity_verlet: integrate with the same step.
    VelocityVerlet(b, timestep=njm.jax_md_dt(DT)).run(N_STEPS)
    return b.get_positions(), b.get_momenta()


@pytest.fixture(scope="module")
def jax_md_trajectory(setup):
    model, params, atoms, momenta = setup
    return _jax_md_nve(model, params, atoms, momenta, N_STEPS, chunk=25)


@pytest.mark.slow
def test_nve_matches_ase_velocity_verlet(setup, ase_trajectory, jax_md_trajectory):
    R_ase, P_ase = ase_trajectory
    R, P, info, _ = jax_md_trajectory
    assert info == dict(steps=N_STEPS, chunks=4, reallocations=0)
    # The atoms really moved (several rebuilds of the list were needed).
    assert np.abs(R - setup[2].positions).max() > 0.5
    np.testing.assert_allclose(R, R_ase, atol=1e-10, rtol=0)
    np.testing.assert_allclose(P, P_ase, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_overflow_loop_reallocates_and_redoes_the_chunk(setup, jax_md_trajectory):
    model, params, atoms, momenta = setup
    r_list = model.r_cut + 0.5
    n_pairs = len(nf.neighbor_pairs(atoms, r_cut=r_list, backend="reference")[0])
    # A list with no spare room overflows as soon as the pair count grows.
    R, P, info, nbrs = _jax_md_nve(model, params, atoms, momenta, N_STEPS, chunk=25,
                                   capacity=n_pairs)
    assert info["reallocations"] >= 1, info
    assert info["steps"] == N_STEPS and not bool(nbrs.did_overflow)
    assert nbrs.capacity > n_pairs
    R_ref, P_ref, _, _ = jax_md_trajectory
    np.testing.assert_allclose(R, R_ref, atol=1e-10, rtol=0)
    np.testing.assert_allclose(P, P_ref, atol=1e-10, rtol=0)


def test_atomic_energies_sum_to_the_energy(setup):
    model, params, atoms, _ = setup
    sys_ = njm.from_atoms(model, params, atoms, backend="reference")  # float32
    nbrs = sys_.neighbor_fn.allocate(sys_.R)
    e = sys_.energy_fn(sys_.R, neighbor=nbrs, kT=0.1)  # extra jax-md kwargs are ignored
    energies = sys_.atomic_energy_fn(sys_.R, nbrs)
    assert energies.shape == (len(atoms),) and energies.dtype == jnp.float32
    np.testing.assert_allclose(float(e), float(jnp.sum(energies)), rtol=1e-6)


@pytest.mark.parametrize("species, match", [
    (np.array([0, 1, 4]), r"\[4\].*outside 0\.\.3"),
    (np.array([0, -1, 2]), r"\[-1\].*outside 0\.\.3"),  # would wrap to the last species
    (np.zeros(3), "integer"),
    (np.zeros((3, 1), int), "1-D"),
])
def test_energy_fn_rejects_bad_species(setup, species, match):
    model, params, _, _ = setup
    with pytest.raises(ValueError, match=match):
        njm.energy_fn(model, params, species, np.eye(3) * 6.0)


def test_energy_fn_rejects_parameters_of_another_model(setup):
    model, params, _, _ = setup
    other = nf.NeuralIL(species=("C", "H", "N", "O"), r_cut=3.0, n_max=3, embed_dim=2,
                        widths=(8, 8))
    with pytest.raises(ValueError, match="has shape"):
        njm.energy_fn(other, params, np.zeros(3, int), np.eye(3) * 6.0)
    from neuralil_fast.committee import stack

    with pytest.raises(ValueError, match=r"take one with committee\.member"):
        njm.energy_fn(model, stack([params, params]), np.zeros(3, int), np.eye(3) * 6.0)


def test_energy_fn_rejects_positions_of_another_size(setup):
    model, params, atoms, _ = setup
    sys_ = njm.from_atoms(model, params, atoms, backend="reference")
    nbrs = sys_.neighbor_fn.allocate(sys_.R)
    longer = njm.energy_fn(model, params, np.append(np.asarray(sys_.species), 0), sys_.cell,
                           backend="reference")
    with pytest.raises(ValueError, match="species give"):  # a gather would clamp silently
        jax.jit(longer)(sys_.R, nbrs)


def test_displacement_is_minimum_image(setup):
    _, _, atoms, _ = setup
    displacement_fn, shift_fn = njm.space(atoms.cell[:])
    a, b = jnp.array([0.1, 0.2, 0.3]), jnp.array([6.9, 0.2, 0.3])
    np.testing.assert_allclose(np.asarray(displacement_fn(a, b)), [0.2, 0.0, 0.0], atol=1e-6)
    # Not wrapped: a shift across the boundary keeps the real-space coordinate.
    np.testing.assert_allclose(np.asarray(shift_fn(b, jnp.array([0.3, 0.0, 0.0]))),
                               [7.2, 0.2, 0.3], atol=1e-6)


@pytest.mark.slow
# jax-md's kinetic_energy asks for a float64 sum even in float32 mode (a harmless warning).
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")
def test_nose_hoover_runs_in_chunks(setup):
    model, params, atoms, _ = setup
    kT = 300 * units.kB
    sys_ = njm.from_atoms(model, params, atoms, skin=0.5, backend="reference")  # float32
    init_fn, apply_fn = simulate.nvt_nose_hoover(sys_.energy_fn, sys_.shift_fn, DT, kT=kT)
    nbrs = sys_.neighbor_fn.allocate(sys_.R)
    state = init_fn(jax.random.key(3), sys_.R, mass=sys_.mass, neighbor=nbrs)
    seen = []
    state, nbrs, info = njm.run(apply_fn, state, nbrs, sys_.neighbor_fn, 40, chunk=20,
                                callback=lambda step, s, n: seen.append(step))
    assert seen == [20, 40] and info["steps"] == 40
    assert state.position.dtype == jnp.float32
    assert np.isfinite(np.asarray(state.position)).all()
    assert np.isfinite(np.asarray(state.momentum)).all()


def test_missing_jax_md_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "jax_md" or name.startswith("jax_md."):
            raise ImportError("No module named 'jax_md'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"neuralil_fast\[md\]"):
        njm.require_jax_md()
