"""``neuralil-fast md``: NVE/Langevin runs, log and trajectory files, one-line errors."""
from __future__ import annotations

import ase
import ase.io
import jax
import numpy as np
import pytest

import neuralil_fast as nf
from neuralil_fast.cli import main
from neuralil_fast.committee import save_committee, stack


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("md")
    model = nf.NeuralIL(species=("C", "H", "N", "O"), r_cut=3.0, n_max=2, embed_dim=2,
                        widths=(8, 8))
    nf.save(d / "m.nil", model, model.init(jax.random.key(0)))
    nf.save(d / "m1.nil", model, model.init(jax.random.key(1)))
    members = stack([nf.load(d / name)[1] for name in ("m.nil", "m1.nil")])
    save_committee(d / "c.nil", model, members)
    nf.save(d / "s.state", model, members, extra={"training": {"epoch": 1}}, committee=True)
    rng = np.random.default_rng(0)
    # A loose 16-atom box: 2x2x2 grid of C-H pairs etc., well separated.
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3) * 3.2
    pos = np.concatenate([grid + 0.5, grid + [1.6, 0.5, 0.5]]) + rng.normal(0, 0.05, (16, 3))
    atoms = ase.Atoms(["C", "N", "O", "H"] * 4, positions=pos, cell=[6.4] * 3, pbc=True)
    atoms.write(d / "box.extxyz")
    ase.Atoms("Si2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=[5] * 3,
              pbc=True).write(d / "si.extxyz")
    (d / "junk.xyz").write_text("this is not a structure\n")
    # three frames, each shifted along x by its index (which frame was read shows in x)
    ase.io.write(d / "frames.extxyz", [atoms.copy() for _ in range(3)])
    frames = ase.io.read(d / "frames.extxyz", index=":")
    for k, f in enumerate(frames):
        f.positions[:, 0] += 0.1 * k
    ase.io.write(d / "frames.extxyz", frames)
    atoms.write(d / "box.gro")
    return d


@pytest.mark.slow
def test_nve_run_writes_log_traj_and_summary(files, capsys):
    d = files
    rc = main(["md", str(d / "m.nil"), str(d / "box.extxyz"), "--steps", "10", "--dt", "0.5",
               "--temperature", "300", "--thermostat", "none", "--traj", str(d / "t.extxyz"),
               "--traj-interval", "5", "--log", str(d / "thermo.log"), "--log-interval", "2",
               "--backend", "reference", "--no-progress", "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "total-energy drift" in out and "meV/atom" in out and "atom-steps/s" in out
    lines = (d / "thermo.log").read_text().splitlines()
    assert lines[0].split()[1:] == ["step", "time_ps", "epot_eV", "ekin_eV", "etot_eV", "T_K"]
    table = np.loadtxt(d / "thermo.log")
    assert table.shape == (6, 6)
    np.testing.assert_array_equal(table[:, 0], [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(table[:, 1], table[:, 0] * 0.5e-3)
    np.testing.assert_allclose(table[:, 4], table[:, 2] + table[:, 3], rtol=1e-9)
    # NVE at 0.5 fs: the total energy is conserved to well under 1 meV/atom over 10 steps.
    assert np.ptp(table[:, 4]) / 16 < 1e-3
    frames = ase.io.read(d / "t.extxyz", index=":")
    assert len(frames) == 3 and "forces" in frames[-1].calc.results


@pytest.mark.slow
def test_langevin_runs(files, capsys):
    d = files
    rc = main(["md", str(d / "m.nil"), str(d / "box.extxyz"), "--steps", "5",
               "--temperature", "300", "--thermostat", "langevin", "--friction", "0.02",
               "--backend", "reference", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "(langevin)" in captured.out


@pytest.mark.parametrize("steps, timing", [(0, "no step taken"), (1, "compilation"),
                                           (2, "after the first step")])
def test_short_runs_summarise_without_nan(files, capsys, steps, timing):
    d = files
    rc = main(["md", str(d / "m.nil"), str(d / "box.extxyz"), "--steps", str(steps),
               "--backend", "reference", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and timing in out and "nan" not in out.lower(), out
    assert ("fit n/a" in out) == (steps < 2)  # a rate needs three energies


def test_committee_runs_on_the_members_mean(files, capsys):
    """A committee file runs on the mean of its members: the first logged potential
    energy is the mean of the two members' energies, each from its own model file, and the
    logged spreads are the members' (energy: standard deviation; forces: the largest
    per-atom sqrt(mean_k |F_k - F_mean|^2))."""
    d = files
    rc = main(["md", str(d / "c.nil"), str(d / "box.extxyz"), "--steps", "1", "--log",
               str(d / "c.log"), "--log-interval", "1", "--backend", "reference",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and "a committee of 2" in captured.err
    energies, forces = [], []
    for name in ("m.nil", "m1.nil"):
        atoms = ase.io.read(d / "box.extxyz")
        atoms.calc = nf.Calculator(d / name, backend="reference")
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    header = (d / "c.log").read_text().splitlines()[0].split()
    assert header[-2:] == ["energy_uncertainty_eV", "max_force_uncertainty_eV_A"]
    first = np.loadtxt(d / "c.log")[0]
    assert first[2] == pytest.approx(np.mean(energies), rel=1e-9)
    assert abs(energies[0] - energies[1]) > 1e-3   # the mean is not either member
    assert first[6] == pytest.approx(np.std(energies), rel=1e-6)
    F = np.array(forces)
    spread = np.sqrt(np.mean(np.sum((F - F.mean(0)) ** 2, -1), 0))
    assert first[7] == pytest.approx(spread.max(), rel=1e-6)
    assert "largest per-atom force spread" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["md", "{d}/m.nil", "{d}/missing.gro"], "no such structure file"),
    (["md", "{d}/missing.nil", "{d}/box.extxyz"], "no such model file"),
    (["md", "{d}/box.extxyz", "{d}/box.extxyz"], "cannot read the model"),
    (["md", "{d}/s.state", "{d}/box.extxyz"], "is a training state"),
    (["md", "{d}/m.nil", "{d}/junk.xyz"], "cannot read the structure"),
    (["md", "{d}/m.nil"], "expected MODEL STRUCTURE"),
    (["md", "{d}/m.nil", "{d}/box.extxyz", "--steps", "-1"], "--steps"),
    (["md", "{d}/m.nil", "{d}/box.extxyz", "--dt", "0"], "--dt"),
    (["md", "{d}/m.nil", "{d}/box.extxyz", "--thermostat", "langevin"], "needs --temperature"),
    (["md", "{d}/m.nil", "{d}/si.extxyz", "--backend", "reference"], "unknown species"),
    (["md", "--neuralil-pickle", "{d}/missing.pickle", "{d}/box.extxyz"], "no such parameter"),
    (["md", "{d}/m.nil", "{d}/box.extxyz", "--backend", "nonsense"], "unknown backend"),
    (["md", "{d}/m.nil", "{d}/frames.extxyz", "--frame", "3"], "has 3 frame(s), no frame 3"),
    (["md", "{d}/m.nil", "{d}/frames.extxyz", "--frame", "-4"], "has 3 frame(s), no frame -4"),
    (["md", "{d}/m.nil", "{d}/box.gro", "--frame", "1"], "has 1 frame(s), no frame 1"),
])
def test_bad_input_is_one_line_error(files, capsys, argv, message):
    rc = main([a.format(d=files) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("name, frame, shift", [
    ("frames.extxyz", None, 0.2), ("frames.extxyz", 0, 0.0), ("frames.extxyz", 1, 0.1),
    ("frames.extxyz", -3, 0.0), ("box.gro", 0, 0.0), ("box.gro", -1, 0.0)])
def test_frame_picks_the_frame(files, name, frame, shift):
    from neuralil_fast.md import _read_structure

    atoms = _read_structure(str(files / name), -1 if frame is None else frame)
    base = ase.io.read(files / "box.extxyz")
    np.testing.assert_allclose(atoms.positions, base.positions + [shift, 0, 0], atol=6e-3)  # .gro: 0.01 Å


@pytest.mark.shared
@pytest.mark.slow
def test_ean_gro_with_the_neuralil_pickle(shared_dir, tmp_path, capsys):
    ean = shared_dir / "data" / "ean"
    rc = main(["md", "--neuralil-pickle", str(ean / "neuralil_morse_params.pickle"),
               str(ean / "EAN_md_initial.gro"), "--steps", "2", "--log",
               str(tmp_path / "l.log"), "--log-interval", "1", "--no-progress",
               "--backend", "reference"])
    assert rc == 0
    table = np.loadtxt(tmp_path / "l.log")
    assert table.shape == (3, 6)
    # The .gro velocities are kept (no --temperature): EAN at about room temperature.
    assert 150 < table[0, 5] < 600
