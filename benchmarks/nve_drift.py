"""NVE total-energy drift of the 225-atom EAN box with the shared NeuralIL+Morse parameters.

    python benchmarks/nve_drift.py --time-ps 10 --dt 0.5 --dtypes float64 float32 --backend numba

Velocity Verlet from EAN_md_initial.gro (its velocities), for each dtype; prints
the drift in meV/atom: last minus first total energy, the largest excursion and
the linear-fit rate per ps.  10 ps = 20000 steps at 0.5 fs: practical with the
numba backend (the reference backend takes ~0.15 s per step); shorten with --time-ps.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from conftest import SHARED


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time-ps", type=float, default=10.0, help="simulated time, ps (10)")
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs (0.5)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                   choices=["float64", "float32"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--structure", default=str(SHARED / "EAN_md_initial.gro"))
    p.add_argument("--pickle", default=str(SHARED / "neuralil_morse_params.pickle"))
    p.add_argument("--log-interval", type=int, default=20, help="steps between energy samples")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for path in (args.structure, args.pickle):
        if not os.path.isfile(path):
            print(f"nve_drift: missing {path} (the shared EAN data)", file=sys.stderr)
            return 2

    import ase.io

    import neuralil_fast as nf
    from neuralil_fast.md import run_md

    model, params = nf.from_neuralil(args.pickle)
    steps = int(round(args.time_ps * 1000.0 / args.dt))
    rows = []
    for dtype in args.dtypes:
        atoms = ase.io.read(args.structure)
        calc = nf.Calculator(model, params, backend=args.backend, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "thermo.log")
            s = run_md(atoms, calc, steps, args.dt, log=log, log_interval=args.log_interval,
                       progress=not args.no_progress)
            table = np.loadtxt(log, ndmin=2)
        etot = table[:, 4] / len(atoms) * 1e3  # meV/atom
        rows.append((dtype, calc.backend, steps, s["drift_meV_per_atom"],
                     float(np.max(np.abs(etot - etot[0]))), s["drift_rate_meV_per_atom_ps"],
                     s["atom_steps_per_s"]))
    print(f"\nNVE drift, EAN {len(atoms)} atoms, dt {args.dt} fs, {args.time_ps} ps\n")
    print("| dtype | backend | steps | drift (meV/atom) | max dev (meV/atom) "
          "| rate (meV/atom/ps) | atom-steps/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:+.4f} | {r[4]:.4f} | {r[5]:+.4f} | {r[6]:.4g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
