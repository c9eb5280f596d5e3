"""``neuralil-fast md``: molecular dynamics with ASE (NVE velocity Verlet or Langevin).

    neuralil-fast md model.nil box.gro --steps 1000 --dt 0.5 --temperature 300 \\
        --thermostat langevin --traj out.extxyz --log thermo.log

Units: dt in fs, temperature in K, friction in 1/fs.  The thermo log has one
line per ``--log-interval`` steps: step, time (ps), Epot, Ekin, Etot (eV), T (K)
and, when the calculator provides it (committees), the energy uncertainty (eV).
The summary gives the total-energy drift (meV/atom, first to last step, and its
linear-fit rate per ps) and the speed in atom-steps/s (after the first force
evaluation, which includes JAX's compilation).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

__all__ = ["add_arguments", "run", "run_md", "thermalize"]


def thermalize(atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` (ASE >= 3.29 renamed the function;
    both names draw the same numbers)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="MODEL STRUCTURE",
                        help="model file written by nf.save, then the structure (anything "
                             "ase.io.read reads, .gro included); with --neuralil-pickle only "
                             "the structure")
    parser.add_argument("--frame", type=int, default=-1,
                        help="which frame of a multi-frame STRUCTURE file to start from "
                             "(Python index; default -1, the last, as ase.io.read)")
    parser.add_argument("--neuralil-pickle", metavar="PICKLE",
                        help="use an original NeuralIL parameter pickle instead of MODEL")
    parser.add_argument("--steps", type=int, default=1000, help="number of MD steps (1000)")
    parser.add_argument("--dt", type=float, default=0.5, help="time step, fs (0.5)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="K: draw Maxwell-Boltzmann velocities at T (and the Langevin "
                             "target); without it the structure's velocities are kept")
    parser.add_argument("--thermostat", choices=["langevin", "none"], default=None,
                        help="langevin (needs --temperature) or none = NVE (default: "
                             "langevin when --temperature is given, else none)")
    parser.add_argument("--friction", type=float, default=0.01,
                        help="Langevin friction, 1/fs (0.01)")
    parser.add_argument("--traj", help="write the trajectory to this extxyz file")
    parser.add_argument("--traj-interval", type=int, default=10, help="steps between frames")
    parser.add_argument("--log", help="write the thermo log to this file")
    parser.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    parser.add_argument("--backend", default="auto",
                        help="reference | numba | triton | auto (default auto)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å")
    parser.add_argument("--seed", type=int, default=0, help="random seed (velocities, Langevin)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(msg):
    from .cli import UserError

    return UserError(msg)


def _load_model(args):
    """((model, params, K), structure path): K members of a committee, else None."""
    import neuralil_fast as nf

    from .committee import load_any

    if args.neuralil_pickle:
        if len(args.paths) != 1:
            raise _error("with --neuralil-pickle give only the STRUCTURE, got "
                         f"{len(args.paths)} paths")
        path = args.neuralil_pickle
        if not os.path.isfile(path):
            raise _error(f"no such parameter pickle: {path}")
        try:
            return (*nf.from_neuralil(path), None), args.paths[0]
        except Exception as err:  # noqa: BLE001 - one line for the user
            raise _error(f"cannot read the NeuralIL pickle {path}: {err}") from err
    if len(args.paths) != 2:
        raise _error(f"expected MODEL STRUCTURE (or --neuralil-pickle PICKLE STRUCTURE), got "
                     f"{len(args.paths)} path(s)")
    path = args.paths[0]
    if not os.path.isfile(path):
        raise _error(f"no such model file: {path}")
    try:
        return load_any(path), args.paths[1]
    except Exception as err:  # noqa: BLE001
        raise _error(f"cannot read the model {path}: {err}") from err


class _NoSuchFrame(LookupError):
    pass


def _read_frame(path, frame: int):
    """Frame ``frame`` (a Python index) of ``path``; _NoSuchFrame naming the frames there are."""
    import ase.io

    if frame == -1:
        return ase.io.read(path)
    if frame >= 0:  # a slice reads up to the frame only, where the format allows
        try:
            got = ase.io.read(path, index=slice(frame, frame + 1))
        except AssertionError:  # ASE's single-frame readers assert index 0
            got = []
        if got:
            return got[0]
    frames = ase.io.read(path, index=":")
    n = len(frames)
    if not -n <= frame < n:
        raise _NoSuchFrame(f"the structure {path} has {n} frame(s), no frame {frame} "
                         f"(--frame takes 0..{n - 1} or -{n}..-1)")
    return frames[frame]


def _read_structure(path, frame: int = -1):
    if not os.path.isfile(path):
        raise _error(f"no such structure file: {path}")
    try:
        atoms = _read_frame(path, frame)
    except _NoSuchFrame as err:
        raise _error(str(err)) from None
    except Exception as err:  # noqa: BLE001
        why = str(err) or "unrecognised, empty or truncated file"
        raise _error(f"cannot read the structure {path}: {why}") from err
    if len(atoms) == 0:
        raise _error(f"the structure {path} has no atoms")
    return atoms


def _check(args):
    if args.steps < 0:
        raise _error(f"--steps must be >= 0, got {args.steps}")
    if not (args.dt > 0 and np.isfinite(args.dt)):
        raise _error(f"--dt must be a positive number of fs, got {args.dt}")
    if args.temperature is not None and not (args.temperature >= 0):
        raise _error(f"--temperature must be >= 0 K, got {args.temperature}")
    if args.thermostat is None:
        args.thermostat = "langevin" if args.temperature is not None else "none"
    if args.thermostat == "langevin" and args.temperature is None:
        raise _error("--thermostat langevin needs --temperature")
    if not (args.friction > 0):
        raise _error(f"--friction must be > 0 (1/fs), got {args.friction}")
    if args.traj_interval < 1 or args.log_interval < 1:
        raise _error("--traj-interval and --log-interval must be >= 1")


def run_md(atoms, calc, steps, dt_fs, thermostat="none", temperature=None, friction=0.01,
           seed=0, traj=None, traj_interval=10, log=None, log_interval=10, progress=True,
           out=None):
    """Run MD on ``atoms`` with ``calc``; returns a summary dict (also printed to ``out``)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    out = sys.stdout if out is None else out
    rng = np.random.default_rng(seed)
    if temperature is not None:
        thermalize(atoms, temperature, rng)
        vd.Stationary(atoms)
    atoms.calc = calc
    dt = dt_fs * units.fs
    if thermostat == "langevin":
        dyn = Langevin(atoms, dt, temperature_K=temperature, friction=friction / units.fs,
                       fixcm=False, rng=rng)
    else:
        dyn = VelocityVerlet(atoms, dt)
    n = len(atoms)
    atoms.get_potential_energy()  # first evaluation: compilation (not timed)
    # Committee calculators put the spread of their energies in the results.
    has_unc = "energy_uncertainty" in calc.results

    log_fh = open(log, "w") if log else None
    traj_fh = open(traj, "w") if traj else None
    records = []
    clock = {}

    def observe():
        step = dyn.nsteps
        if step == 1:  # the first step compiles the neighbour-list update: not timed
            clock["t1"] = time.perf_counter()
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        rec = [step, step * dt_fs * 1e-3, epot, ekin, epot + ekin,
               ekin / (1.5 * n * units.kB)]
        if has_unc:  # and the largest per-atom force spread: where the model extrapolates
            rec += [float(calc.results.get("energy_uncertainty", np.nan)),
                    float(np.max(calc.results.get("forces_uncertainty", np.nan)))]
        records.append(rec)
        if log_fh and step % log_interval == 0:
            log_fh.write(" ".join(f"{v:.10g}" if k > 1 else (f"{v:d}" if k == 0 else f"{v:.6f}")
                                  for k, v in enumerate(rec)) + "\n")
            log_fh.flush()
        if traj_fh and step % traj_interval == 0:
            import ase.io

            ase.io.write(traj_fh, atoms, format="extxyz")
            traj_fh.flush()

    try:
        if log_fh:
            cols = "step time_ps epot_eV ekin_eV etot_eV T_K" + (
                " energy_uncertainty_eV max_force_uncertainty_eV_A" if has_unc else "")
            log_fh.write("# " + cols + "\n")
        bar = tqdm(total=steps, unit="step", disable=not progress or steps == 0,
                   file=sys.stderr, dynamic_ncols=True)
        # ASE calls the observers at step 0 too (before the first step).
        dyn.attach(observe, interval=1)
        dyn.attach(lambda: bar.update(1) if dyn.nsteps > 0 else None, interval=1)
        t0 = time.perf_counter()
        dyn.run(steps)
        t_end = time.perf_counter()
        wall = t_end - t0
        bar.close()
    finally:
        if log_fh:
            log_fh.close()
        if traj_fh:
            traj_fh.close()
    rec = np.asarray(records)
    etot = rec[:, 4]
    drift = (etot[-1] - etot[0]) / n * 1e3
    rate = float(np.polyfit(rec[:, 1], etot / n * 1e3, 1)[0]) if len(rec) > 2 else float("nan")
    if steps > 1 and "t1" in clock:
        speed = n * (steps - 1) / max(t_end - clock["t1"], 1e-12)
        timed = "after the first step"
    else:
        speed = n * steps / wall if wall > 0 else float("nan")
        timed = "the first step included: compilation"
    summary = dict(n_atoms=n, steps=steps, dt_fs=dt_fs, thermostat=thermostat,
                   drift_meV_per_atom=float(drift), drift_rate_meV_per_atom_ps=rate,
                   wall_s=wall, atom_steps_per_s=speed,
                   final_T_K=float(rec[-1, 5]))
    if has_unc:
        summary["max_force_uncertainty_eV_A"] = float(np.max(rec[:, 7]))
    print(f"md: {n} atoms, {steps} steps of {dt_fs} fs ({thermostat}), "
          f"{steps * dt_fs * 1e-3:.4f} ps", file=out)
    fit = f"{rate:+.4f} meV/atom/ps" if np.isfinite(rate) else "n/a (fewer than 3 records)"
    print(f"  total-energy drift: {drift:+.4f} meV/atom (first to last step), fit {fit}",
          file=out)
    timing = (f"speed {speed:.4g} atom-steps/s ({n / speed * 1e3:.2f} ms/step, {timed})"
              if steps > 0 and speed > 0 else "no step taken")
    print(f"  final T {summary['final_T_K']:.1f} K;  {timing}", file=out)
    if has_unc:
        print(f"  committee: largest per-atom force spread "
              f"{summary['max_force_uncertainty_eV_A'] * 1e3:.1f} meV/Å (any step)", file=out)
    return summary


def run(args) -> int:
    _check(args)
    (model, params, size), structure = _load_model(args)
    atoms = _read_structure(structure, args.frame)
    from .calculator import Calculator

    if size is not None:
        print(f"md: a committee of {size}: the members' mean forces", file=sys.stderr)
    calc = Calculator(model, params, backend=args.backend, skin=args.skin, dtype=args.dtype,
                      committee=size is not None)
    # Unknown species, bad cells: one-line ValueErrors from the calculator's first call.
    try:
        atoms.calc = calc
        atoms.get_potential_energy()
    except ValueError as err:
        raise _error(f"{structure}: {err}") from err
    run_md(atoms, calc, args.steps, args.dt, thermostat=args.thermostat,
           temperature=args.temperature, friction=args.friction, seed=args.seed,
           traj=args.traj, traj_interval=args.traj_interval, log=args.log,
           log_interval=args.log_interval, progress=not args.no_progress)
    return 0
