"""The article's ablations on the EAN DFT data, each variant with the same budget and split.

    python benchmarks/train_ablations.py --max-minutes 8 --parallel 2 --out ablations

Variants (``--variants`` picks a subset), each trained through ``neuralil-fast train``:

    full                 the NeuralIL model (swish + LayerNorm, element-resolved densities)
    no-element-resolved  ``--no-element-resolved``: one neighbour density for all species
    selu                 ``--activation selu``: SELU without LayerNorm
    energy-only          ``--energy-only``: trained on energies only

Shared settings: the documented split of the shared data (60 configurations,
``--n-valid 12 --split-seed 0``: the last 12 of ``default_rng(0).permutation(60)``),
``--outliers 41`` reported separately, ``--schedule run`` (default), ``--max-minutes``
of training per variant (neighbour lists and start-up not counted).

Every variant runs as its own subprocess (``python -m neuralil_fast train``), pinned to
one core with ``taskset -c CORE`` and single-threaded (``NUMBA_NUM_THREADS=1``,
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``,
``OMP_NUM_THREADS=1``), so that each gets the same compute; ``--parallel N`` runs N at
once on the cores of ``--cores`` (default: the first N cores this process may use).
Each variant writes OUT/VARIANT/{model.nil, log.json, train.out}; the table is read back
from the logs (``--report-only`` prints it again without training) and written to
OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import EAN

SPECIES = ("C", "H", "N", "O")
VARIANTS = {
    "full": [],
    "no-element-resolved": ["--no-element-resolved"],
    "selu": ["--activation", "selu"],
    "energy-only": ["--energy-only"],
}
SINGLE_THREAD_ENV = {
    "NUMBA_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def train_argv(args, variant: str, folder: Path) -> list[str]:
    argv = ["train", str(args.data), "--species", *SPECIES, "--ean-pairs", str(args.ean_pairs),
            "--n-valid", str(args.n_valid), "--split-seed", str(args.split_seed),
            "--outliers", *[str(i) for i in args.outliers], "--schedule", args.schedule,
            "--seed", str(args.seed), "--committee", str(args.committee),
            "--backend", args.backend, "--out", str(folder / "model.nil"),
            "--log", str(folder / "log.json"), "--no-progress"]
    if args.max_minutes is not None:
        argv += ["--max-minutes", str(args.max_minutes)]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    return argv + VARIANTS[variant]


def launch(args, variant: str, core: int):
    folder = Path(args.out) / variant
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("log.json", "model.nil", "model.nil.state"):
        (folder / stale).unlink(missing_ok=True)  # a fresh run, never a resumed one
    cmd = [sys.executable, "-m", "neuralil_fast", *train_argv(args, variant, folder)]
    env = dict(os.environ, **SINGLE_THREAD_ENV)
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
        preexec = None
    else:
        def preexec():
            os.sched_setaffinity(0, {core})
    (folder / "command.txt").write_text(
        shlex.join(["env", *(f"{k}={v}" for k, v in SINGLE_THREAD_ENV.items()), *cmd]) + "\n")
    out = open(folder / "train.out", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=preexec)
    print(f"[{time.strftime('%H:%M:%S')}] {variant}: started on core {core} "
          f"(pid {proc.pid}), output in {folder / 'train.out'}", flush=True)
    return proc, out


def run_all(args, variants, cores) -> dict:
    pending = list(variants)
    free = list(cores)
    running = {}  # variant -> (proc, file, core, t0)
    status = {}
    while pending or running:
        while pending and free:
            v = pending.pop(0)
            core = free.pop(0)
            proc, f = launch(args, v, core)
            running[v] = (proc, f, core, time.perf_counter())
        time.sleep(1.0)
        for v, (proc, f, core, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            f.close()
            del running[v]
            free.append(core)
            status[v] = {"returncode": rc, "process_wall_s": time.perf_counter() - t0,
                         "core": core}
            print(f"[{time.strftime('%H:%M:%S')}] {v}: finished, exit status {rc}, "
                  f"{status[v]['process_wall_s']:.0f} s", flush=True)
    return status


def _get(d: dict, *keys) -> float:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return math.nan
        d = d[k]
    return float(d)


def summarize(args, variants, status) -> list[dict]:
    rows = []
    for v in variants:
        log_path = Path(args.out) / v / "log.json"
        row = {"variant": v, "flags": " ".join(VARIANTS[v]) or "-", **status.get(v, {})}
        if not log_path.is_file():
            row["error"] = f"no log at {log_path}"
            rows.append(row)
            continue
        log = json.loads(log_path.read_text())
        fin = log.get("final")
        if fin is None:  # an interrupted run: its last epoch
            row["error"] = "run did not finish (last epoch's metrics)"
            last = log["epochs"][-1] if log.get("epochs") else {}
            valid, epochs, best, wall = last.get("valid", {}), last.get("epoch"), None, \
                last.get("wall_time_s", math.nan)
        else:
            valid, epochs, best, wall = fin["valid"], fin["epochs_run"], fin["best_epoch"], \
                fin["wall_time_s"]
        settings = log.get("settings", {})
        row.update({
            "max_minutes": settings.get("max_minutes"), "planned_epochs": settings.get("epochs"),
            "schedule": settings.get("schedule"), "committee": settings.get("committee"),
            "epochs": epochs, "best_epoch": best, "train_wall_s": wall,
            "n_train": log.get("n_train"), "n_valid": log.get("n_valid"),
            "valid_ids": log.get("valid_ids"),
            "force_mae_meV_A": _get(valid, "all", "force_mae_mev_A"),
            "force_mae_meV_A_without_outliers": _get(valid, "without_outliers", "force_mae_mev_A"),
            "energy_mae_meV_atom": _get(valid, "all", "energy_mae_mev_atom"),
            "energy_mae_meV_atom_without_outliers": _get(valid, "without_outliers",
                                                         "energy_mae_mev_atom"),
            "force_rmse_meV_A": _get(valid, "all", "force_rmse_mev_A"),
            "energy_rmse_meV_atom": _get(valid, "all", "energy_rmse_mev_atom"),
        })
        rows.append(row)
    return rows


def print_table(args, rows) -> None:
    o = ",".join(str(i) for i in args.outliers) or "-"
    r0 = next((r for r in rows if "epochs" in r), {})  # settings as the logs record them
    minutes, epochs = r0.get("max_minutes"), r0.get("planned_epochs")
    budget = " / ".join(([f"{minutes} min"] if minutes is not None else []) +
                        ([f"{epochs} epochs"] if epochs is not None else []))
    print(f"\nAblations, EAN DFT: {r0.get('n_train')} train / {r0.get('n_valid')} "
          f"validation (split seed {args.split_seed}), schedule {r0.get('schedule')}, "
          f"budget {budget} per variant, committee {r0.get('committee')}\n")
    print(f"| variant | flags | epochs (best) | train s | force MAE (meV/Å) all "
          f"| force MAE w/o {o} | energy MAE (meV/atom) all | energy MAE w/o {o} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "epochs" not in r:
            print(f"| {r['variant']} | {r['flags']} | {r.get('error')} | | | | | |")
            continue
        best = "-" if r["best_epoch"] is None else r["best_epoch"]
        note = " (unfinished)" if r.get("error") else ""
        print(f"| {r['variant']}{note} | {r['flags']} | {r['epochs']} ({best}) "
              f"| {r['train_wall_s']:.0f} | {r['force_mae_meV_A']:.1f} "
              f"| {r['force_mae_meV_A_without_outliers']:.1f} "
              f"| {r['energy_mae_meV_atom']:.2f} | {r['energy_mae_meV_atom_without_outliers']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(EAN),
                   help="NeuralIL JSON Lines data (default: the shared EAN DFT set)")
    p.add_argument("--out", default="ablations", help="output folder (ablations)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="training minutes per variant (8)")
    p.add_argument("--epochs", type=int, help="epochs per variant (instead of or besides "
                   "the budget; pass --max-minutes 0 for epochs only)")
    p.add_argument("--schedule", default="run", choices=("run", "epoch"))
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="variants run at once, one core each (1)")
    p.add_argument("--cores", type=int, nargs="+",
                   help="the cores to pin the variants to (default: the first N this "
                   "process may run on)")
    p.add_argument("--committee", type=int, default=1, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-valid", type=int, default=12)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--outliers", type=int, nargs="*", default=[41])
    p.add_argument("--ean-pairs", type=int, default=15)
    p.add_argument("--backend", default="auto")
    p.add_argument("--report-only", action="store_true",
                   help="no training: print the table from the logs in --out")
    args = p.parse_args(argv)
    if args.max_minutes is not None and args.max_minutes <= 0:
        args.max_minutes = None
    if args.max_minutes is None and args.epochs is None:
        p.error("give --max-minutes > 0 or --epochs")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    variants = list(dict.fromkeys(args.variants))
    status = {}
    if not args.report_only:
        if not os.path.isfile(args.data):
            print(f"train_ablations: missing {args.data} (the shared EAN data)", file=sys.stderr)
            return 2
        n = min(args.parallel, len(variants))
        cores = args.cores or sorted(os.sched_getaffinity(0))[:n]
        if len(cores) < n:
            p.error(f"--parallel {n} needs {n} cores, this process may use {cores}: "
                    "pass --cores (repeating a core shares it: unequal compute)")
        cores = cores[:n]
        if len(set(cores)) < len(cores):
            print(f"train_ablations: warning: cores {cores} repeat; variants sharing a core "
                  "do not get the same compute", file=sys.stderr)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        status = run_all(args, variants, cores)
    rows = summarize(args, variants, status)
    print_table(args, rows)
    summary = {"data": str(args.data), "schedule": args.schedule,
               "max_minutes": args.max_minutes, "epochs": args.epochs,
               "committee": args.committee, "split_seed": args.split_seed,
               "n_valid": args.n_valid, "outliers": args.outliers,
               "env": SINGLE_THREAD_ENV, "parallel": args.parallel, "variants": rows}
    if not args.report_only:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"\nwrote {Path(args.out) / 'summary.json'}")
    failed = [r["variant"] for r in rows if r.get("returncode") not in (None, 0) or "epochs" not in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
