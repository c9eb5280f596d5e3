"""Species energies on data of varying composition: GFN2-xTB clusters of small molecules.

    python benchmarks/species_energies.py --max-minutes 5 --out species_energies

Data (made here, needs tblite: ``pip install -e ".[data]"``): ``--n-configs``
non-periodic clusters of 2-4 closed-shell C/H/N/O molecules of ASE's g2 set, each
molecule rattled (0.05 Å) and placed at random without contacts under 2.5 Å, labelled
with GFN2-xTB (the settings of ``neuralil_fast.datagen.label``); seeded, so every run
makes the same set.  Compositions vary from cluster to cluster, and xTB's total energies
run from about -11 eV per H atom to -100 eV per O atom.

Then ``neuralil-fast train`` twice with the same split, budget and seed:
``--species-energies fit`` (a least-squares reference energy per species) and ``none``
(one common offset, which the network's bias fits). Writes OUT/{clusters.extxyz,
fit/, none/, summary.json}; ``--report-only`` prints the table again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPECIES = ("C", "H", "N", "O")


def closed_shell_molecules():
    from ase.build import molecule
    from ase.collections import g2
    from ase.data import atomic_numbers

    out = []
    for name in g2.names:
        m = molecule(name)
        symbols = set(m.get_chemical_symbols())
        electrons = sum(atomic_numbers[s] for s in m.get_chemical_symbols())
        if symbols <= set(SPECIES) and len(m) >= 2 and electrons % 2 == 0 \
                and not m.get_initial_magnetic_moments().any():
            out.append(m)
    return out


def make_clusters(n: int, seed: int = 0):
    from ase import Atoms

    from neuralil_fast.datagen import label as xlabel

    rng = np.random.default_rng(seed)
    pool = closed_shell_molecules()
    calc = xlabel.make_calculator(cache_api=False)
    frames = []
    while len(frames) < n:
        k = int(rng.integers(2, 5))
        cluster = Atoms()
        for m in (pool[i] for i in rng.choice(len(pool), k)):
            m = m.copy()
            m.rotate(rng.uniform(0, 360), rng.normal(size=3))
            m.positions += rng.normal(0, 0.05, m.positions.shape)
            for _ in range(100):  # a place without contacts under 2.5 Å (else left out)
                shift = rng.uniform(-4.0, 4.0, 3)
                if len(cluster) == 0 or np.min(np.linalg.norm(
                        (m.positions + shift)[:, None] - cluster.positions[None], axis=-1)) > 2.5:
                    m.positions += shift
                    cluster += m
                    break
        try:
            frames.append(xlabel.label(cluster, calc=calc))
        except Exception as err:  # noqa: BLE001 - an SCF that fails: draw another cluster
            print(f"skipped a cluster ({err})", file=sys.stderr)
    return frames


def train(data: Path, folder: Path, mode: str, args) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "neuralil_fast", "train", str(data), "--species", *SPECIES,
            "--n-valid", str(args.n_valid), "--max-minutes", str(args.max_minutes),
            "--schedule", "run", "--size-groups", "4", "--species-energies", mode,
            "--out", str(folder / "model.nil"), "--log", str(folder / "log.json"),
            "--no-progress"]
    with open(folder / "train.out", "w") as fh:
        subprocess.run(argv, check=True, stdout=fh, stderr=subprocess.STDOUT)


def report(out: Path) -> dict:
    rows = {}
    for mode in ("fit", "none"):
        log = json.loads((out / mode / "log.json").read_text())
        v = log["final"]["valid"]["all"]
        rows[mode] = {"epochs": log["final"]["epochs_run"], "best_epoch": log["final"]["best_epoch"],
                      "energy_mae_mev_atom": v["energy_mae_mev_atom"],
                      "force_mae_mev_A": v["force_mae_mev_A"],
                      "species_energies": log["model"].get("species_energies")}
    print("| species energies | epochs | energy MAE (meV/atom) | force MAE (meV/Å) |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['epochs']} | {r['energy_mae_mev_atom']:.2f} | "
              f"{r['force_mae_mev_A']:.1f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="species_energies")
    p.add_argument("--n-configs", type=int, default=400)
    p.add_argument("--n-valid", type=int, default=80)
    p.add_argument("--max-minutes", type=float, default=5.0)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        data = out / "clusters.extxyz"
        if not data.is_file():
            from neuralil_fast.io import from_atoms, write_dataset

            t = time.perf_counter()
            frames = make_clusters(args.n_configs)
            write_dataset(data, [from_atoms(a) for a in frames])
            sizes = [len(a) for a in frames]
            print(f"labelled {len(frames)} clusters ({min(sizes)}-{max(sizes)} atoms) in "
                  f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
        for mode in ("fit", "none"):
            train(data, out / mode, mode, args)
    rows = report(out)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
