"""Model + potential + calculator against independent oracles.

- forces vs central finite differences of the energy, stress vs ASE's numerical stress
  (float64, Morse term included);
- the original NeuralIL's own figures on the shared EAN data, from its parameters;
- save → load bit for bit; a short NVE run conserves energy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet

import neuralil_fast as nf
from conftest import fd_forces, numerical_stress

SPECIES = ("C", "H", "N", "O")


def _small_atoms(seed=0, n=10, box=5.0):
    rng = np.random.default_rng(seed)
    cell = np.diag([box, box * 1.05, box * 0.97]) + rng.uniform(-0.4, 0.4, (3, 3))
    # a jittered grid keeps atoms apart
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    frac = (grid + 0.5 + rng.uniform(-0.2, 0.2, (n, 3))) / 3.0
    return Atoms(symbols=rng.choice(SPECIES, n), scaled_positions=frac, cell=cell, pbc=True)


def _model_and_params(seed=0):
    model = nf.NeuralIL(species=SPECIES, r_cut=3.0, n_max=3, widths=(16, 8, 8))
    with jax.enable_x64(True):
        params = model.init(jax.random.key(seed), jnp.float64)
        # make the Morse term matter at these distances
        params["params"]["morse"]["embed"]["embedding"] = params["params"]["morse"]["embed"][
            "embedding"] * 0 + jnp.array([1.2, 1.1, 0.3])
    return model, params


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_forces_and_stress_vs_finite_differences(backend):
    model, params = _model_and_params()
    atoms = _small_atoms()
    atoms.calc = nf.Calculator(model, params, backend=backend, skin=0.3)
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    assert np.abs(forces).max() > 1e-3
    rows = [0, 3, 7]  # a few atoms keep the test short; each sees Morse and NN terms
    fd = fd_forces(atoms, lambda: nf.Calculator(model, params, backend=backend), rows)
    np.testing.assert_allclose(forces[rows], fd, rtol=1e-6, atol=1e-6 * np.abs(forces).max())
    numerical = numerical_stress(atoms)
    np.testing.assert_allclose(stress, numerical, rtol=1e-6, atol=1e-6 * np.abs(stress).max())
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(),
                                                                 rel=1e-12)


def test_save_load_bit_for_bit(tmp_path):
    model, params = _model_and_params(3)
    path = tmp_path / "model.nil"
    nf.save(path, model, params)
    model2, params2 = nf.load(path)
    assert model2 == model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    (tmp_path / "bad.nil").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError):
        nf.load(tmp_path / "bad.nil")
    (tmp_path / "foreign.nil").write_text(json.dumps({"not": "a model"}))
    with pytest.raises(ValueError):
        nf.load(tmp_path / "foreign.nil")


def test_species_energies_shift_energies_only(dtype, tol):
    """Each atom's energy moves by its species' entry (mapping or sorted sequence alike);
    forces and stress stay the same; single and committee paths agree.  (The table enters
    after the descriptors, in ``apply_network``: the same on every backend.)"""
    from neuralil_fast.committee import committee_evaluate_jit, stack
    from neuralil_fast.neighbors import allocate
    from neuralil_fast.potential import evaluate_jit

    model, params = _model_and_params()
    table = {"O": -432.1, "C": -148.7, "H": -13.6, "N": -271.5}
    shifted = nf.NeuralIL(**(model.to_config() | {"species_energies": table}))
    assert shifted.species_energies == tuple(table[s] for s in SPECIES)
    assert shifted == nf.NeuralIL(**(model.to_config()
                                     | {"species_energies": [table[s] for s in SPECIES]}))
    atoms = _small_atoms(n=12)
    backend = "reference"
    nl = allocate(atoms.positions, atoms.cell.array, atoms.pbc, model.r_cut, backend=backend)
    species = jnp.asarray(nf.geometry.species_indices(atoms.numbers, model.species))
    args = (jnp.asarray(atoms.positions, dtype), jnp.asarray(atoms.cell.array, dtype), species,
            nl.centers, nl.neighbors, nl.shifts)
    base = evaluate_jit(model, params, *args, backend=backend, stress=True)
    out = evaluate_jit(shifted, params, *args, backend=backend, stress=True)
    want = np.array([table[s] for s in atoms.get_chemical_symbols()])
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(out["energies"]) - np.asarray(base["energies"]), want,
                               rtol=0, atol=tol["rtol"] * scale)
    np.testing.assert_allclose(float(out["energy"] - base["energy"]), want.sum(), rtol=tol["rtol"])
    for k in ("forces", "stress"):
        ref = np.asarray(base[k])
        np.testing.assert_allclose(np.asarray(out[k]), ref, rtol=0,
                                   atol=tol["rtol"] * np.abs(ref).max(), err_msg=k)
    committee = committee_evaluate_jit(shifted, stack([params, params]), *args, backend=backend)
    np.testing.assert_allclose(np.asarray(committee["energies"][1]), np.asarray(out["energies"]),
                               rtol=0, atol=tol["rtol"] * scale)


def test_species_energies_are_saved_and_checked(tmp_path):
    model, params = _model_and_params()
    shifted = nf.NeuralIL(**(model.to_config() | {"species_energies": (-1.0, -2.0, -3.0, -4.5)}))
    nf.save(tmp_path / "s.nil", shifted, params)
    assert nf.load(tmp_path / "s.nil")[0] == shifted
    # a model without them writes the settings it always wrote (older versions read them)
    assert "species_energies" not in model.to_config()
    for bad, match in [((-1.0, -2.0), "4 finite energies"), ((-1.0, -2.0, np.nan, 0.0), "finite"),
                       ({"C": 1.0, "H": 1.0, "N": 1.0}, "missing \\['O'\\]"),
                       ({"C": 1, "H": 1, "N": 1, "O": 1, "S": 1}, "unexpected \\['S'\\]"),
                       ("abc", "finite energies")]:
        with pytest.raises(ValueError, match=match):
            nf.NeuralIL(species=SPECIES, species_energies=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(species=("H", "H")), "distinct"),
    (dict(species=("H", "Xx")), "unknown element"),
    (dict(widths=()), "widths"),
    (dict(widths=(8, 0)), "widths"),
    (dict(activation="relu"), "activation"),
    (dict(embed_dim=0), "embed_dim"),
    (dict(embed_dim=1.5), "embed_dim"),
    (dict(r_cut=0.0), "r_cut"),
    (dict(n_max=-1), "n_max"),
])
def test_model_rejects_bad_settings(kwargs, match):
    settings = dict(species=SPECIES, r_cut=3.0, n_max=3, widths=(16, 8)) | kwargs
    with pytest.raises(ValueError, match=match):
        nf.NeuralIL(**settings)


@pytest.mark.parametrize("other, match", [
    (dict(n_max=2), r"\['Inlet'\]\['kernel'\] has shape"),
    (dict(widths=(16, 8, 8, 8)), "missing"),
    (dict(morse=False), "unexpected"),
    (dict(species=("C", "H", "N")), "has shape"),
])
def test_parameters_of_another_model_are_rejected(tmp_path, other, match):
    """Calculator and nf.save name the first parameter that does not fit the model."""
    from neuralil_fast.committee import save_committee, stack

    _, params = _model_and_params()
    model = nf.NeuralIL(**(dict(species=SPECIES, r_cut=3.0, n_max=3, widths=(16, 8, 8)) | other))
    with pytest.raises(ValueError, match=match):
        nf.Calculator(model, params)
    with pytest.raises(ValueError, match=match):
        nf.save(tmp_path / "m.nil", model, params)
    with pytest.raises(ValueError, match=match):
        save_committee(tmp_path / "c.nil", model, stack([params, params]))
    assert not list(tmp_path.iterdir())


def test_committee_flag_and_skin_are_checked():
    from neuralil_fast.committee import stack

    model, params = _model_and_params()
    with pytest.raises(ValueError, match="committee=True"):
        nf.Calculator(model, stack([params, params]))
    nf.Calculator(model, stack([params, params]), committee=True)
    for skin in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="skin"):
            nf.Calculator(model, params, skin=skin)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_atom_unwrapped_far_from_the_cell(dtype, tol):
    """An atom thousands of Å out (an unwrapped MD trajectory) is its image in the cell.

    float32 resolves 7 000 Å to 5e-4 Å: evaluated there, forces were off by ~1e-3 eV/Å.
    """
    model, params = _model_and_params()
    near = _small_atoms(n=12)
    far = near.copy()
    far.positions[3] += np.array([1000, -300, 50]) @ far.cell[:]
    got = {}
    for name, atoms in (("near", near), ("far", far)):
        atoms.calc = nf.Calculator(model, params, backend="numba", dtype=dtype)
        got[name] = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    for a, b in zip(got["far"], got["near"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_calculator_rejects_unknown_species():
    model, params = _model_and_params()
    atoms = Atoms("Fe2", positions=[[0, 0, 0], [1.5, 0, 0]], cell=[5, 5, 5], pbc=True)
    atoms.calc = nf.Calculator(model, params, backend="reference")
    with pytest.raises(ValueError, match="Fe"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("pbc", [True, False])
def test_empty_structure_has_zero_energy(backend, pbc):
    """No atoms: energy 0, empty per-atom arrays, zero stress; one model and a committee."""
    from neuralil_fast.committee import stack

    model, params = _model_and_params()
    sb = nf.SphericalBessel(species=SPECIES, r_cut=3.0, n_max=3)
    assert sb.compute(Atoms(cell=[5, 5, 5], pbc=pbc), backend=backend).shape == (0, sb.n_features)
    for p, committee in ((params, False), (stack([params, params]), True)):
        atoms = Atoms(cell=[5, 5, 5], pbc=pbc)
        atoms.calc = nf.Calculator(model, p, backend=backend, committee=committee)
        assert atoms.get_potential_energy() == 0.0
        assert atoms.get_forces().shape == (0, 3)
        assert atoms.get_potential_energies().shape == (0,)
        if pbc:
            np.testing.assert_array_equal(atoms.get_stress(), np.zeros(6))


def test_stress_of_a_non_periodic_structure_says_why():
    from ase.calculators.calculator import PropertyNotImplementedError

    model, params = _model_and_params()
    atoms = _small_atoms()
    atoms.pbc = [True, True, False]
    atoms.calc = nf.Calculator(model, params, backend="reference")
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        atoms.get_stress()


def test_evaluate_cli_matches_the_calculator(tmp_path, capsys):
    """``neuralil-fast evaluate --json``: MAE/RMSE equal those computed here from nf.Calculator."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from neuralil_fast.cli import main

    model, params = _model_and_params()
    nf.save(tmp_path / "m.nil", model, params)
    rng = np.random.default_rng(5)
    frames, de, df = [], [], []
    calc = nf.Calculator(model, params, backend="reference")
    for k in range(4):
        atoms = _small_atoms(n=10)  # rattled copies: one size, few compilations
        atoms.positions += rng.normal(size=atoms.positions.shape) * 0.02
        atoms.calc = calc
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        e_ref, f_ref = e + rng.normal() * 0.05, f + rng.normal(size=f.shape) * 0.1
        de.append((e - e_ref) / len(atoms))
        df.append(f - f_ref)
        atoms.calc = SinglePointCalculator(atoms, energy=e_ref, forces=f_ref)
        frames.append(atoms)
    data = tmp_path / "data.extxyz"
    ase.io.write(data, frames)
    args = ["evaluate", str(tmp_path / "m.nil"), str(data), "--backend", "numba", "--json"]
    for exclude in ([], [2]):
        capsys.readouterr()
        assert main(args + ["--exclude", *map(str, exclude)]) == 0
        m = json.loads(capsys.readouterr().out)
        keep = [k for k in range(4) if k not in exclude]
        e_err = 1000 * np.array([de[k] for k in keep])
        f_err = 1000 * np.concatenate([df[k] for k in keep])
        assert m["n_configs"] == len(keep)
        assert m["energy_mae_meV_per_atom"] == pytest.approx(np.abs(e_err).mean(), rel=1e-5)
        assert m["force_rmse_meV_per_A"] == pytest.approx(np.sqrt((f_err ** 2).mean()), rel=1e-5)
        assert "per_config" not in m
    assert main(args + ["--exclude", "2", "--per-config"]) == 0
    rows = json.loads(capsys.readouterr().out)["per_config"]
    assert [r["index"] for r in rows] == [0, 1, 3]
    for r in rows:
        k = r["index"]
        assert r["energy_error_meV_per_atom"] == pytest.approx(1000 * de[k], rel=1e-5)
        assert r["force_mae_meV_per_A"] == pytest.approx(1000 * np.abs(df[k]).mean(), rel=1e-5)
    assert main(args[:-1] + ["--per-config"]) == 0   # the table: the worst first
    table = capsys.readouterr().out.splitlines()
    worst = max(range(4), key=lambda k: np.abs(df[k]).mean())
    at = table.index(next(l for l in table if l.startswith("largest errors (4 of 4")))
    assert table[at + 2].split()[0] == str(worst)
    for exclude, message in (([4], "outside 0..3"), ([0, 1, 2, 3], "no configuration")):
        assert main(args + ["--exclude", *map(str, exclude)]) == 2
        assert message in capsys.readouterr().err
    # forces are optional: their metrics cover the configurations that carry them
    for with_forces in ([0, 2], []):
        for k, atoms in enumerate(frames):
            if k not in with_forces:
                atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
        ase.io.write(data, frames)
        capsys.readouterr()
        assert main(args) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["n_configs"] == 4 and m["n_configs_forces"] == len(with_forces)
        e_err = 1000 * np.array(de)
        assert m["energy_mae_meV_per_atom"] == pytest.approx(np.abs(e_err).mean(), rel=1e-5)
        if with_forces:
            f_err = 1000 * np.concatenate([df[k] for k in with_forces])
            assert m["force_mae_meV_per_A"] == pytest.approx(np.abs(f_err).mean(), rel=1e-5)
        else:
            assert "force_mae_meV_per_A" not in m and m["per_element"] == {}
            assert main(args[:-1]) == 0
            table = capsys.readouterr().out
            assert "(0 with forces)" in table and "n/a" in table
    # the program keeps its compiled kernels and XLA programs between runs: a second run
    # loads them (nothing new written) and prints the same numbers
    cache = tmp_path / "cache"
    env = dict(os.environ, NEURALIL_FAST_CACHE=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "neuralil_fast", *args], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        metrics = json.loads(r.stdout)
        metrics.pop("seconds")
        runs.append((metrics, sorted(p.name for p in (cache / "xla").iterdir()),
                     sorted(p.name for p in (cache / "ffi").glob("*.py"))))
    assert runs[0][1] and runs[0][2] and runs[1] == runs[0]


def test_evaluate_cli_on_a_committee(tmp_path, capsys):
    """``evaluate`` on a committee file: the errors of the members' mean, the mean energy
    and force spreads and the Spearman rho of the per-atom force spread against the
    per-atom force error, all against the members evaluated one by one (nf.Calculator
    on each single model) and scipy; a training state file is refused in one line."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from scipy.stats import spearmanr

    from neuralil_fast.cli import main
    from neuralil_fast.committee import save_committee, stack

    model, p0 = _model_and_params(0)
    members = [p0] + [_model_and_params(seed)[1] for seed in (1, 2)]  # 3: the spread's
    # definition matters (with 2, |F_k - F_mean| is the same for both members)
    save_committee(tmp_path / "c.nil", model, stack(members))
    calcs = [nf.Calculator(model, p, backend="reference") for p in members]
    rng = np.random.default_rng(6)
    frames, de, df, e_spread, f_spread = [], [], [], [], []
    for k in range(3):
        atoms = _small_atoms(n=10)
        atoms.positions += rng.normal(size=atoms.positions.shape) * 0.02
        e, f = [], []
        for calc in calcs:
            atoms.calc = calc
            e.append(atoms.get_potential_energy())
            f.append(atoms.get_forces())
        e, f = np.array(e), np.array(f)
        e_ref, f_ref = e.mean() + rng.normal() * 0.05, f.mean(0) + rng.normal(size=f[0].shape) * 0.1
        de.append((e.mean() - e_ref) / len(atoms))
        df.append(f.mean(0) - f_ref)
        e_spread.append(e.std() / len(atoms))
        f_spread.append(np.sqrt(np.mean(np.sum((f - f.mean(0)) ** 2, -1), 0)))
        atoms.calc = SinglePointCalculator(atoms, energy=e_ref, forces=f_ref)
        frames.append(atoms)
    data = tmp_path / "data.extxyz"
    ase.io.write(data, frames)
    args = ["evaluate", str(tmp_path / "c.nil"), str(data), "--backend", "numba"]
    assert main(args + ["--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    dF = 1000 * np.concatenate(df)
    assert m["committee_size"] == 3
    assert m["energy_mae_meV_per_atom"] == pytest.approx(1000 * np.abs(de).mean(), rel=1e-6)
    assert m["force_mae_meV_per_A"] == pytest.approx(np.abs(dF).mean(), rel=1e-6)
    c = m["committee"]
    assert c["energy_spread_mean_meV_per_atom"] == pytest.approx(1000 * np.mean(e_spread),
                                                                 rel=1e-6)
    assert c["force_spread_mean_meV_per_A"] == pytest.approx(
        1000 * np.concatenate(f_spread).mean(), rel=1e-6)
    rho = spearmanr(np.concatenate(f_spread), np.linalg.norm(dF, axis=-1)).statistic
    assert c["spearman_force_spread_vs_error"] == pytest.approx(rho, abs=1e-9)
    assert main(args + ["--per-config"]) == 0
    table = capsys.readouterr().out
    assert "committee of 3" in table and "spread" in table.splitlines()[-4]
    assert main(args + ["--json", "--per-config"]) == 0
    for r in json.loads(capsys.readouterr().out)["per_config"]:
        assert r["force_spread_mean_meV_per_A"] == pytest.approx(
            1000 * f_spread[r["index"]].mean(), rel=1e-6)
    nf.save(tmp_path / "s.state", model, stack(members), extra={"training": {"epoch": 1}},
            committee=True)
    assert main(["evaluate", str(tmp_path / "s.state"), str(data)]) == 2
    assert "is a training state" in capsys.readouterr().err


def test_padded_size_ladder():
    from neuralil_fast.evaluate import padded_size

    n = np.arange(1, 20000)
    p = np.array([padded_size(int(k)) for k in n])
    assert np.all(p >= n) and np.all(p[n <= 8] == n[n <= 8])
    assert np.all(p[n > 8] <= 1.25 * n[n > 8])
    for k in range(3, 14):  # four rungs per doubling
        assert len(set(p[(n > 2**k) & (n <= 2**(k + 1))])) == 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_evaluate_many_sizes_on_the_padded_ladder(dtype, monkeypatch):
    """More atom counts than EXACT_SIZES (lowered to 2 to compile less): each
    configuration, evaluated on the ladder with masked padding atoms, equals its
    evaluation alone at its own size."""
    from neuralil_fast import evaluate
    from neuralil_fast.evaluate import padded_size, predict
    from neuralil_fast.io import from_atoms

    monkeypatch.setattr(evaluate, "EXACT_SIZES", 2)
    model, params = _model_and_params()
    sizes = [5, 9, 18]
    assert [padded_size(n) for n in sizes] == [5, 10, 20]
    configs = [from_atoms(_small_atoms(seed=k, n=n)) for k, n in enumerate(sizes)]
    E, F = predict(model, params, configs, backend="numba", dtype=dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-5, 2e-5)
    for k, c in enumerate(configs):
        (e,), (f,) = predict(model, params, [c], backend="numba", dtype=dtype)
        np.testing.assert_allclose(E[k], e, rtol=rtol)
        np.testing.assert_allclose(F[k], f, rtol=rtol, atol=atol * np.abs(f).max())
        assert F[k].shape == (c.n_atoms, 3) and np.abs(f).max() > 0


@pytest.mark.shared
@pytest.mark.slow
def test_evaluate_reproduces_original_neuralil(shared_dir):
    """The original code's figures on ean_dft_60.jsonl, from its own parameters."""
    ean = shared_dir / "data" / "ean"
    out = subprocess.run(
        [sys.executable, "-m", "neuralil_fast", "evaluate", str(ean / "neuralil_morse_params.pickle"),
         str(ean / "ean_dft_60.jsonl"), "--ean-pairs", "15", "--remove-offset", "--json",
         "--backend", "numba"], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert m["force_mae_meV_per_A"] == pytest.approx(65.59, abs=0.1)
    assert m["force_rmse_meV_per_A"] == pytest.approx(103.69, abs=0.1)
    assert m["energy_mae_meV_per_atom"] == pytest.approx(1.776, abs=0.01)
    assert m["energy_rmse_meV_per_atom"] == pytest.approx(3.164, abs=0.01)
    assert m["energy_offset_meV_per_atom"] == pytest.approx(1128.65, abs=0.01)
    for s, ref in {"C": 58.0, "H": 41.7, "N": 156.2, "O": 74.1}.items():
        assert m["per_element"][s]["force_mae_meV_per_A"] == pytest.approx(ref, abs=0.1)


@pytest.mark.shared
@pytest.mark.slow
def test_nve_energy_conservation_ean(shared_dir):
    from ase.io import read

    ean = shared_dir / "data" / "ean"
    atoms = read(ean / "EAN_md_initial.gro")
    model, params = nf.from_neuralil(ean / "neuralil_morse_params.pickle")
    atoms.calc = nf.Calculator(model, params, backend="numba")
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy() / len(atoms)), interval=5)
    dyn.run(200)
    energies = np.array(energies) * 1000.0
    assert np.ptp(energies) < 1.0, f"total energy wandered by {np.ptp(energies):.3f} meV/atom"


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("block_atoms", [1, 7])
def test_blocked_evaluation_equals_one_pass(backend, block_atoms, dtype, tol):
    """Centres in blocks (a lax.scan over contiguous pair runs) give the one-pass result."""
    from neuralil_fast.neighbors import allocate
    from neuralil_fast.potential import block_pairs_needed, evaluate_jit

    model, params = _model_and_params()
    atoms = _small_atoms(n=24, box=6.0)  # 24 atoms: for 7 the last block is a partial one
    nl = allocate(atoms.positions, atoms.cell.array, atoms.pbc, model.r_cut, 0.3,
                  backend=backend)
    species = jnp.asarray(nf.geometry.species_indices(atoms.numbers, model.species))
    args = (model, params, jnp.asarray(atoms.positions, dtype),
            jnp.asarray(atoms.cell.array, dtype), species, nl.centers, nl.neighbors, nl.shifts)
    ref = evaluate_jit(*args, backend=backend, stress=True)
    need = int(block_pairs_needed(nl.centers, len(atoms), block_atoms))
    assert 0 < need < nl.capacity
    out = evaluate_jit(*args, backend=backend, stress=True, block_atoms=block_atoms,
                       block_pairs=need)
    assert int(out.pop("max_block_pairs")) == need
    for k in ("energy", "energies", "forces", "stress"):
        scale = float(np.max(np.abs(ref[k])))
        np.testing.assert_allclose(out[k], ref[k], rtol=0,
                                   atol=tol["rtol"] * 10 * scale + tol["atol"], err_msg=k)
    # A window one slot short is reported, never silently used.
    short = evaluate_jit(*args, backend=backend, stress=True, block_atoms=block_atoms,
                         block_pairs=need - 1)
    assert int(short["max_block_pairs"]) > need - 1


def test_calculator_blocks_large_systems_and_grows_its_window():
    """The calculator's blocked path equals the one-pass path, also after the window grows."""
    model, params = _model_and_params()
    atoms = _small_atoms(n=24, box=6.0)
    one = atoms.copy()
    one.calc = nf.Calculator(model, params, backend="numba", block_atoms=None)
    blocked = atoms.copy()
    calc = nf.Calculator(model, params, backend="numba", block_atoms=5)
    blocked.calc = calc
    np.testing.assert_allclose(blocked.get_forces(), one.get_forces(), rtol=0, atol=1e-10)
    calc._block_pairs = 8  # too small for any block of 5 centres: must be detected and grown
    blocked.positions = blocked.positions + 1e-3
    one.positions = one.positions + 1e-3
    np.testing.assert_allclose(blocked.get_forces(), one.get_forces(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(blocked.get_stress(), one.get_stress(), rtol=0, atol=1e-12)
    assert calc._block_pairs > 8
    with pytest.raises(ValueError, match="block_atoms"):
        nf.Calculator(model, params, block_atoms=0)


def test_blocked_calculator_open_cluster_with_isolated_atoms():
    """Open boundaries, an atom with no neighbours, and blocks that hold no pair at all."""
    from ase import Atoms

    model, params = _model_and_params()
    atoms = _small_atoms(n=12, box=6.0)
    far = Atoms("HO", positions=[[40.0, 0.0, 0.0], [0.0, 40.0, 0.0]])  # no neighbours
    cluster = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, pbc=False) + far
    one = cluster.copy()
    one.calc = nf.Calculator(model, params, backend="numba", block_atoms=None)
    blocked = cluster.copy()
    blocked.calc = nf.Calculator(model, params, backend="numba", block_atoms=1)
    np.testing.assert_allclose(blocked.get_forces(), one.get_forces(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(blocked.get_potential_energies(), one.get_potential_energies(),
                               rtol=0, atol=1e-10)
    assert np.abs(one.get_forces()[-2:]).max() == 0.0


def _morse_literal(abd, switch_param, r, species_i, species_j, r_cut):
    """The article's Morse pair energies (P,), as written there: numpy, float64."""
    a, b, d = (np.asarray(abd, np.float64)[:, k] for k in range(3))
    ai, bi, di, aj, bj, dj = a[species_i], b[species_i], d[species_i], a[species_j], \
        b[species_j], d[species_j]
    r1 = (aj * r + 0.25 * np.log(ai * di / (aj * dj)) + 0.5 * (ai * bi - aj * bj)) / (ai + aj)
    phi = di * np.exp(-2.0 * ai * (2.0 * r1 - bi))
    r_s = 0.5 * (1.0 + 1.0 / (1.0 + np.exp(-switch_param))) * r_cut
    t = (r * r - r_s * r_s) / (r_cut * r_cut - r_s * r_s)
    with np.errstate(divide="ignore", over="ignore"):
        h = lambda u: np.where(u > 0, np.exp(-1.0 / np.where(u > 0, u, 1.0)), 0.0)  # noqa: E731
        G = h(t) / (h(t) + h(1.0 - t))
    return 0.5 * (1.0 - G) * phi


def test_morse_term_matches_the_article_formula(dtype, tol):
    """Per-atom Morse energies against the literal formula (below, across and beyond the
    switching region), and their gradients in r and the parameters (first and second order:
    forces and the force loss) against finite differences of the float64 formula."""
    from neuralil_fast.model import morse_atomic_energies

    rng = np.random.default_rng(4)
    S, n_atoms, r_cut = 4, 6, 3.0
    abd = np.stack([rng.uniform(0.8, 1.6, S), rng.uniform(0.5, 1.5, S),
                    rng.uniform(0.1, 0.5, S)], axis=1)
    switch = 0.3
    r = np.concatenate([rng.uniform(0.6, 3.2, 60), [1e-9, 2.999999]])
    si, sj = rng.integers(0, S, r.size), rng.integers(0, S, r.size)
    centers = rng.integers(0, n_atoms, r.size)
    valid = (r > 1e-6) & (r < r_cut)

    def per_atom_literal(abd, r):
        pair = np.where(valid, _morse_literal(abd, switch, np.where(valid, r, 1.0), si, sj,
                                              r_cut), 0.0)
        return np.bincount(centers, pair, minlength=n_atoms)

    def ours(abd, r):
        return morse_atomic_energies(abd, jnp.asarray(switch, dtype), r, jnp.asarray(valid),
                                     jnp.asarray(si), jnp.asarray(sj), jnp.asarray(centers),
                                     n_atoms, r_cut)

    A, R = jnp.asarray(abd, dtype), jnp.asarray(r, dtype)
    e = np.asarray(ours(A, R), np.float64)
    ref = per_atom_literal(abd, r)
    assert np.all(ref > 0) and np.any(r[valid] > 0.75 * r_cut)  # the switch region is used
    rtol = tol["rtol"]
    np.testing.assert_allclose(e, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    # dE/dr (forces) and d/d(abd) of a force-like loss, against central differences
    w = rng.normal(size=r.size)
    dEdr = jax.grad(lambda R: jnp.sum(ours(A, R)))
    h = 1e-6
    fd_r = np.array([(per_atom_literal(abd, r + h * (np.arange(r.size) == k)).sum()
                      - per_atom_literal(abd, r - h * (np.arange(r.size) == k)).sum()) / (2 * h)
                     for k in range(r.size)])
    rtol = 10 * rtol + 1e-7  # central differences of the float64 formula: ~1e-9
    np.testing.assert_allclose(np.asarray(dEdr(R)), fd_r, rtol=rtol,
                               atol=rtol * np.abs(fd_r).max())

    def force_loss_literal(abd):
        g = np.array([(per_atom_literal(abd, r + h * (np.arange(r.size) == k)).sum()
                       - per_atom_literal(abd, r - h * (np.arange(r.size) == k)).sum())
                      / (2 * h) for k in range(r.size)])
        return float(np.sum(w * g))

    W = jnp.asarray(w, dtype)
    g_ours = np.asarray(jax.grad(lambda A: jnp.sum(W * jax.grad(
        lambda R: jnp.sum(ours(A, R)))(R)))(A), np.float64)
    hp = 1e-4
    g_fd = np.zeros_like(abd)
    for idx in np.ndindex(*abd.shape):
        step = np.zeros_like(abd)
        step[idx] = hp
        g_fd[idx] = (force_loss_literal(abd + step) - force_loss_literal(abd - step)) / (2 * hp)
    rtol = rtol + 1e-5  # nested differences: ~1e-7
    np.testing.assert_allclose(g_ours, g_fd, rtol=rtol, atol=rtol * np.abs(g_fd).max())


def test_swish_and_its_derivatives(dtype, tol):
    """Swish-1 with its written derivative rule: values, first and second derivatives
    against the closed forms, and check_grads (order 2) against finite differences."""
    from jax.test_util import check_grads

    from neuralil_fast.model import swish

    x = jnp.asarray(np.concatenate([np.linspace(-30, 30, 61), [-1e4, 1e4, 0.0]]), dtype)
    xn = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-xn))
    d1 = s * (1 + xn * (1 - s))
    d2 = s * (1 - s) * (2 + xn * (1 - 2 * s))
    rtol = tol["rtol"]
    np.testing.assert_allclose(np.asarray(swish(x)), xn * s, rtol=rtol, atol=rtol)
    g1 = jax.vmap(jax.grad(swish))(x)
    g2 = jax.vmap(jax.grad(jax.grad(swish)))(x)
    np.testing.assert_allclose(np.asarray(g1), d1, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(np.asarray(g2), d2, rtol=rtol, atol=rtol)
    xs = jnp.asarray(np.linspace(-4, 4, 9), dtype)
    if dtype == jnp.float64:
        check_grads(swish, (xs,), order=2, modes=("fwd", "rev"))


def test_network_equals_the_concatenated_dense_formula(dtype, tol):
    """The inlet's split matmul (descriptors @ kernel[:F] + (embedding @ kernel[F:])[species])
    against the literal concat-then-Dense network, written out in numpy (float64)."""
    model = nf.NeuralIL(species=SPECIES, r_cut=3.0, n_max=3, widths=(16, 8, 8))
    params = model.init(jax.random.key(2), dtype)
    rng = np.random.default_rng(5)
    F = model.spec.n_features
    X = rng.normal(size=(13, F))
    sp = rng.integers(0, len(SPECIES), 13)
    e, _ = model.apply_network(params, jnp.asarray(X, dtype), jnp.asarray(sp, jnp.int32))

    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    core = P["core_model"]
    sw = lambda v: v / (1 + np.exp(-v))  # noqa: E731

    def dense(v, name):
        return v @ core[name]["kernel"] + core[name]["bias"]

    def layer_norm(v, name):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * core[name]["scale"] + core[name]["bias"]

    h = sw(dense(np.concatenate([X, P["embed"]["embedding"][sp]], axis=1), "Inlet"))
    for k in range(1, len(model.widths)):
        h = sw(layer_norm(dense(h, f"Stage_{k}"), f"LayerNorm_{k - 1}"))
    out = sw(dense(h, "Outlet"))
    ref = (out @ P["denormalizer"]["kernel"] + P["denormalizer"]["bias"])[:, 0]
    rtol = tol["rtol"]
    np.testing.assert_allclose(np.asarray(e, np.float64), ref, rtol=rtol,
                               atol=rtol * np.abs(ref).max())
