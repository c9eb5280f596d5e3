"""``neuralil-fast demo``: the main job on bundled data, nothing to download.

Trains a NeuralIL potential on the bundled GFN2-xTB EAN data set (60-atom
periodic boxes), prints the validation errors, writes a parity plot, then runs
a short NVE MD with the trained model through the ASE calculator and prints the
energy drift and the speed.
"""
from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np

DATA_NAME = "ean_xtb.xyz"


def bundled_data() -> Path:
    path = Path(str(resources.files("neuralil_fast") / "data" / DATA_NAME))
    if not path.is_file():
        raise FileNotFoundError(f"bundled data set {path} is missing from this installation")
    return path


def add_arguments(p):
    p.add_argument("--out", default="demo_out", help="folder for the model, log and plot")
    p.add_argument("--max-minutes", type=float, default=3.0,
                   help="training time budget (one LR cycle planned to fit in it)")
    p.add_argument("--md-steps", type=int, default=400, help="NVE steps of 0.5 fs")
    p.add_argument("--backend", default="auto", help="reference | numba | triton | auto")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ase.io import read
    from ase.md.verlet import VelocityVerlet
    from ase import units

    from .backends import resolve_backend
    from .calculator import Calculator
    from .cli import main as cli_main
    from .md import thermalize

    # checked here so that the errors name the demo's options, before any training
    if not (args.max_minutes > 0 and math.isfinite(args.max_minutes)):
        raise ValueError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    if args.md_steps < 1:
        raise ValueError(f"--md-steps must be >= 1, got {args.md_steps}")
    resolve_backend(args.backend)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the demo writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = bundled_data()
    model_path = out / "model.nil"
    log_path = out / "train_log.json"
    print(f"[demo] training on {data.name} for up to {args.max_minutes:g} min "
          f"(backend {args.backend})", flush=True)
    code = cli_main([
        "train", str(data), "--species", "C", "H", "N", "O", "--out", str(model_path),
        "--max-minutes", str(args.max_minutes), "--schedule", "run", "--n-valid", "40",
        "--split-seed", str(args.seed), "--seed", str(args.seed), "--backend", args.backend,
        "--log", str(log_path), "--parity", str(out / "parity.png"),
    ])
    if code:
        return code
    log = json.loads(log_path.read_text())
    valid = log["final"]["valid"]["all"]
    force_std = 1e3 * np.std(np.concatenate([a.get_forces().ravel() for a in read(data, ":")]))
    print(f"[demo] validation MAE after {log['final']['epochs_run']} epochs: energy "
          f"{valid['energy_mae_mev_atom']:.2f} meV/atom, forces {valid['force_mae_mev_A']:.1f} "
          f"meV/Å ({100 * valid['force_mae_mev_A'] / force_std:.1f}% of the data's force std "
          f"{force_std:.0f} meV/Å); parity plot {out / 'parity.png'}", flush=True)

    atoms = read(data, index=0)
    atoms.calc = Calculator(str(model_path), backend=args.backend)
    thermalize(atoms, 300.0, np.random.default_rng(args.seed))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    dyn.run(1)  # compile
    t0 = time.perf_counter()
    dyn.run(args.md_steps)
    seconds = time.perf_counter() - t0
    e = np.array(energies) / len(atoms) * 1000.0
    print(f"[demo] NVE {args.md_steps} steps x 0.5 fs, {len(atoms)} atoms: total-energy drift "
          f"{e[-1] - e[0]:+.3f} meV/atom (max excursion {e.max() - e.min():.3f}), "
          f"{len(atoms) * args.md_steps / seconds:,.0f} atom-steps/s", flush=True)
    return 0
