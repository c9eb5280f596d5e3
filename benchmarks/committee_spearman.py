"""Does a committee's per-atom force spread rank its per-atom force error?  (EAN, DFT)

    python benchmarks/committee_spearman.py --committee 8 --max-minutes 8 --out committee8.nil \\
        --json committee8_spearman.json

or, with a committee already trained on the same split (``neuralil-fast train ... --committee 8``):

    python benchmarks/committee_spearman.py --model committee8.nil --json committee8_spearman.json

Training goes through the command line (``neuralil_fast.cli.main(["train", ...])``) with
the documented split of the shared data: 60 configurations, ``--n-valid 12 --split-seed 0``
(``numpy.random.default_rng(0).permutation(60)``, the last 12 validate: configurations
5 14 15 29 31 33 39 41 45 49 56 59), ``--outliers 41`` (reported separately),
``--schedule run``, K independently initialised members trained on the same batches.

The committee then predicts the 12 validation configurations (``committee_evaluate_jit``,
descriptors once, K networks).  Per atom i, with F_k the force of member k:

    spread_i = sqrt( mean_k |F_k,i - mean_k F_k,i|^2 )      eV/Å
             = the norm of the per-component (population) standard deviation,
               ``committee.summarize``'s ``forces_uncertainty``
             (sqrt of the mean over the 3 components of the variance is this / sqrt(3):
              the same ranking, the same Spearman rho)
    error_i  = | mean_k F_k,i - F_ref,i |                    eV/Å

Printed: Spearman rho (``scipy.stats.spearmanr``) of spread against error over all
validation atoms, without configuration 41, per element, and per configuration (with the
median over configurations); the committee-mean force MAE; the acceptance check of the
issue (rho >= 0.5 on validation).  ``--json`` also writes it all to a file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from conftest import EAN

SPECIES = ("C", "H", "N", "O")
THRESHOLD = 0.5


def _train(args, out: Path) -> dict:
    """Train the committee through the CLI; returns the run's JSON log."""
    from neuralil_fast.cli import main as cli_main

    log = out.with_name(out.name + ".log.json")
    argv = ["train", str(args.data), "--species", *SPECIES, "--ean-pairs", str(args.ean_pairs),
            "--n-valid", str(args.n_valid), "--split-seed", str(args.split_seed),
            "--outliers", *[str(i) for i in args.outliers], "--committee", str(args.committee),
            "--schedule", args.schedule, "--seed", str(args.seed), "--backend", args.backend,
            "--out", str(out), "--log", str(log)]
    if args.max_minutes is not None:
        argv += ["--max-minutes", str(args.max_minutes)]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.no_progress:
        argv.append("--no-progress")
    print("training: neuralil-fast " + " ".join(argv), flush=True)
    rc = cli_main(argv)
    if rc != 0:
        raise SystemExit(f"committee_spearman: training failed (exit status {rc})")
    return json.loads(log.read_text())


def committee_forces(model, params, configs, backend: str, dtype: str):
    """Member forces (K, N, 3) eV/Å, numpy float64, for each configuration (one compilation)."""
    import jax
    import jax.numpy as jnp

    from neuralil_fast.committee import committee_evaluate_jit
    from neuralil_fast.geometry import species_indices
    from neuralil_fast.neighbors import allocate

    out = []
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.float64 if dtype == "float64" else jnp.float32
        lists = [allocate(c.positions, c.cell, c.pbc, model.r_cut, backend=backend,
                          capacity_multiplier=1.0) for c in configs]
        capacity = max(nl.capacity for nl in lists)
        for c, nl in zip(configs, lists):
            if nl.capacity != capacity:  # one static pair capacity: one compilation
                nl = allocate(c.positions, c.cell, c.pbc, model.r_cut, backend=backend,
                              capacity=capacity)
            sp = species_indices(c.numbers, model.species)
            res = committee_evaluate_jit(model, params, jnp.asarray(c.positions, dt),
                                         jnp.asarray(c.cell, dt), jnp.asarray(sp), nl.centers,
                                         nl.neighbors, nl.shifts, backend=backend)
            out.append(np.asarray(res["forces"], np.float64))
    return out


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return math.nan
    return float(spearmanr(x, y).statistic)


def analyse(configs, ids, forces_K, outliers) -> dict:
    spread, error, symbols, owner = [], [], [], []
    per_config = []
    for cid, c, F in zip(ids, configs, forces_K):
        mean = F.mean(0)                                              # (N, 3)
        s = np.sqrt(np.mean(np.sum((F - mean) ** 2, axis=-1), axis=0))  # (N,)
        e = np.linalg.norm(mean - c.forces, axis=-1)                  # (N,)
        spread.append(s)
        error.append(e)
        symbols.append(np.asarray(c.symbols))
        owner.append(np.full(c.n_atoms, cid))
        per_config.append({
            "config": int(cid), "outlier": int(cid) in outliers, "n_atoms": int(c.n_atoms),
            "rho": spearman(s, e),
            "mean_spread_meV_A": float(1e3 * s.mean()),
            "mean_error_meV_A": float(1e3 * e.mean()),
            "force_mae_meV_A": float(1e3 * np.mean(np.abs(mean - c.forces))),
        })
    spread, error = np.concatenate(spread), np.concatenate(error)
    symbols, owner = np.concatenate(symbols), np.concatenate(owner)
    clean = ~np.isin(owner, list(outliers))

    def pooled(mask):
        return {"n_atoms": int(mask.sum()), "rho": spearman(spread[mask], error[mask]),
                "mean_spread_meV_A": float(1e3 * spread[mask].mean()),
                "mean_error_meV_A": float(1e3 * error[mask].mean())}

    rhos = np.array([p["rho"] for p in per_config])
    rhos_clean = np.array([p["rho"] for p in per_config if not p["outlier"]])
    res = {
        "spread_definition": "sqrt(mean_k |F_k - F_mean|^2) per atom (norm of the per-component "
                             "population std); error: |F_mean - F_ref| per atom",
        "all": pooled(np.ones_like(clean)),
        "without_outliers": pooled(clean),
        "per_element": {s: pooled(symbols == s) for s in sorted(set(symbols.tolist()))},
        "per_element_without_outliers": {s: pooled((symbols == s) & clean)
                                         for s in sorted(set(symbols.tolist()))},
        "per_config": per_config,
        "per_config_median_rho": float(np.median(rhos)),
        "per_config_median_rho_without_outliers": (float(np.median(rhos_clean))
                                                   if rhos_clean.size else math.nan),
    }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(EAN),
                   help="NeuralIL JSON Lines data (default: the shared EAN DFT set)")
    p.add_argument("--model", help="an already trained committee (nf.save / save_committee "
                   "file, trained on the same split): skip training")
    p.add_argument("--out", help="where to write the trained committee (default: a "
                   "temporary folder, removed afterwards); its log goes to OUT.log.json")
    p.add_argument("--committee", type=int, default=8, metavar="K", help="members (8)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="training budget (8)")
    p.add_argument("--epochs", type=int, help="epochs (instead of or besides the budget)")
    p.add_argument("--schedule", default="run", choices=("run", "epoch"))
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--n-valid", type=int, default=12)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--outliers", type=int, nargs="*", default=[41])
    p.add_argument("--ean-pairs", type=int, default=15)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"),
                   help="evaluation precision (float64)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        print(f"committee_spearman: missing {args.data} (the shared EAN data)", file=sys.stderr)
        return 2
    if args.model is None and args.committee < 2:
        print("committee_spearman: --committee must be >= 2", file=sys.stderr)
        return 2

    from neuralil_fast.backends import resolve_backend
    from neuralil_fast.committee import load_any
    from neuralil_fast.io import ean_species_sequence, read_dataset
    from neuralil_fast.training.data import split_indices

    train_log = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            out = Path(args.out) if args.out else Path(tmp) / "committee.nil"
            train_log = _train(args, out)
            model_path = out
        else:
            model_path = Path(args.model)
        model, params, K = load_any(model_path)
    if K is None or K < 2:
        print(f"committee_spearman: {model_path} is not a committee of 2 or more models",
              file=sys.stderr)
        return 2

    configs = read_dataset(args.data, species_sequence=ean_species_sequence(args.ean_pairs),
                           species=model.species)
    _, valid_ids = split_indices(len(configs), args.n_valid, args.split_seed)
    if train_log is not None and [int(i) for i in valid_ids] != train_log["valid_ids"]:
        raise SystemExit("committee_spearman: the training run's validation ids differ")
    valid = [configs[i] for i in valid_ids]
    backend = resolve_backend(args.backend)
    forces_K = committee_forces(model, params, valid, backend, args.dtype)
    res = analyse(valid, [int(i) for i in valid_ids], forces_K, set(args.outliers))
    res.update({"data": str(args.data), "model": str(model_path) if args.model or args.out
                else None, "committee": int(K), "backend": backend, "dtype": args.dtype,
                "valid_ids": [int(i) for i in valid_ids], "outliers": list(args.outliers)})
    if train_log is not None:
        fin = train_log["final"]
        res["training"] = {"max_minutes": args.max_minutes, "epochs": args.epochs,
                           "schedule": args.schedule, "epochs_run": fin["epochs_run"],
                           "best_epoch": fin["best_epoch"], "wall_time_s": fin["wall_time_s"],
                           "valid": fin["valid"]}

    # ------------------------------------------------------------------ report
    o = ",".join(str(i) for i in args.outliers) or "-"
    print(f"\nCommittee of {K}, EAN validation: {len(valid)} configurations "
          f"{res['valid_ids']}, {backend} {args.dtype}")
    if "training" in res:
        t = res["training"]
        print(f"training: {t['epochs_run']} epochs in {t['wall_time_s']:.0f} s "
              f"(best epoch {t['best_epoch']}), schedule {t['schedule']}")
    print("spread = sqrt(mean_k |F_k - F_mean|^2), error = |F_mean - F_ref| (per atom)\n")
    print("| atoms | n | Spearman rho | mean spread (meV/Å) | mean error (meV/Å) |")
    print("|---|---|---|---|---|")
    rows = [("all validation", res["all"]), (f"without {o}", res["without_outliers"])]
    rows += [(f"{s} only, without {o}", r)
             for s, r in res["per_element_without_outliers"].items()]
    for name, r in rows:
        print(f"| {name} | {r['n_atoms']} | {r['rho']:.3f} | {r['mean_spread_meV_A']:.1f} "
              f"| {r['mean_error_meV_A']:.1f} |")
    print("\n| config | Spearman rho | mean spread (meV/Å) | mean error (meV/Å) "
          "| force MAE (meV/Å) |")
    print("|---|---|---|---|---|")
    for r in sorted(res["per_config"], key=lambda r: r["config"]):
        name = f"{r['config']}{' (outlier)' if r['outlier'] else ''}"
        print(f"| {name} | {r['rho']:.3f} | {r['mean_spread_meV_A']:.1f} "
              f"| {r['mean_error_meV_A']:.1f} | {r['force_mae_meV_A']:.1f} |")
    print(f"| median over configs | {res['per_config_median_rho']:.3f} | | | |")
    print(f"| median without {o} | {res['per_config_median_rho_without_outliers']:.3f} | | | |")
    ok_all, ok_clean = res["all"]["rho"] >= THRESHOLD, res["without_outliers"]["rho"] >= THRESHOLD
    res["acceptance"] = {"threshold": THRESHOLD, "all": bool(ok_all),
                         "without_outliers": bool(ok_clean)}
    print(f"\nacceptance (Spearman rho >= {THRESHOLD} on validation): all atoms "
          f"{'PASS' if ok_all else 'FAIL'} ({res['all']['rho']:.3f}); without {o} "
          f"{'PASS' if ok_clean else 'FAIL'} ({res['without_outliers']['rho']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
