"""MD cost per step vs system size: the EAN box replicated k x k x k (225 k^3 atoms).

    python benchmarks/bench_md_scaling.py --backend numba --reps 1 2 4 8 17 --steps 5

Each size runs in its own subprocess (so that peak memory, from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, belongs to that size alone; JAX
allocates outside Python's tracemalloc).  One step = ASE velocity Verlet with
``nf.Calculator`` (energy + forces + stress, neighbour list kept with a skin).
Reported per size: time of the first evaluation (compilation included), time
per step (after one warm-up step), atom-steps/s, peak RSS.  Prints a markdown
table and writes a PNG plot (``--plot``).  Sizes that fail or time out are
listed with the reason and the run goes on.  Meaningful once the numba backend
is wired (the reference backend's dense neighbour build is O(N^2)).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import SHARED


def worker(args) -> int:
    import resource

    import ase.io
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import neuralil_fast as nf

    model, params = nf.from_neuralil(args.pickle)
    atoms = ase.io.read(args.structure).repeat((args.rep,) * 3)
    calc = nf.Calculator(model, params, backend=args.backend, dtype=args.dtype, skin=args.skin)
    atoms.calc = calc
    t0 = time.perf_counter()
    atoms.get_forces()
    first = time.perf_counter() - t0
    dyn = VelocityVerlet(atoms, args.dt * units.fs)
    dyn.run(1)  # warm-up: compiles the neighbour-list update
    t0 = time.perf_counter()
    dyn.run(args.steps)
    per_step = (time.perf_counter() - t0) / args.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB -> MB (Linux)
    print(json.dumps(dict(rep=args.rep, n_atoms=len(atoms), backend=calc.backend,
                          dtype=args.dtype, first_s=first, step_s=per_step,
                          atom_steps_per_s=len(atoms) / per_step, peak_rss_mb=rss)))
    return 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "step_s" in r]
    if not ok:
        return
    n = [r["n_atoms"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].loglog(n, [r["step_s"] for r in ok], "o-")
    axes[0].loglog(n, [ok[0]["step_s"] * x / n[0] for x in n], "k:", label="linear")
    axes[0].set(xlabel="atoms", ylabel="time per step (s)")
    axes[0].legend()
    axes[1].semilogx(n, [r["atom_steps_per_s"] for r in ok], "o-")
    axes[1].set(xlabel="atoms", ylabel="atom-steps / s")
    axes[2].loglog(n, [r["peak_rss_mb"] for r in ok], "o-")
    axes[2].set(xlabel="atoms", ylabel="peak RSS (MB)")
    fig.suptitle(f"NeuralIL MD step (energy + forces + stress), backend {ok[0]['backend']}, "
                 f"{ok[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, nargs="+", default=[1, 2, 4, 8, 17],
                   help="replications k per axis: 225 k^3 atoms (17 -> 1.1 M)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per size")
    p.add_argument("--dt", type=float, default=0.5, help="fs")
    p.add_argument("--skin", type=float, default=0.5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size")
    p.add_argument("--structure", default=str(SHARED / "EAN_md_initial.gro"))
    p.add_argument("--pickle", default=str(SHARED / "neuralil_morse_params.pickle"))
    p.add_argument("--plot", default="bench_md_scaling.png")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    for path in (args.structure, args.pickle):
        if not os.path.isfile(path):
            print(f"bench_md_scaling: missing {path} (the shared EAN data)", file=sys.stderr)
            return 2
    rows = []
    for k in args.reps:
        cmd = [sys.executable, __file__, "--worker", "--rep", str(k), "--steps", str(args.steps),
               "--dt", str(args.dt), "--skin", str(args.skin), "--backend", args.backend,
               "--dtype", args.dtype, "--structure", args.structure, "--pickle", args.pickle]
        n = 225 * k**3
        print(f"... {n} atoms", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append(dict(rep=k, n_atoms=n, error=f"timeout after {args.timeout:.0f} s"))
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append(dict(rep=k, n_atoms=n, error=f"exit {proc.returncode}: {tail[:120]}"))
            continue
        rows.append(json.loads(lines[-1]))
    print("\n| atoms | backend | dtype | first call (s) | time/step (s) | atom-steps/s "
          "| peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n_atoms']} | | | | {r['error']} | | |")
        else:
            print(f"| {r['n_atoms']} | {r['backend']} | {r['dtype']} | {r['first_s']:.2f} "
                  f"| {r['step_s']:.4g} | {r['atom_steps_per_s']:.4g} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
