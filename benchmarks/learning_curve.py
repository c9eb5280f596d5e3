"""Learning curve of a training run: validation MAE against wall time, from its JSON log.

    python benchmarks/learning_curve.py LOG.json [LOG2.json ...] --out curve.png

Prints, at a few wall times, the validation errors of the model kept so far (the
epoch with the lowest validation force MAE, as `train` keeps it) and plots the per-epoch validation force MAE (all configurations and, when
the run named outliers, without them) against training wall time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def kept_so_far(metric):
    """Index of the epoch kept after each epoch (lowest metric so far)."""
    out, best = [], 0
    for i, v in enumerate(metric):
        if v < metric[best]:
            best = i
        out.append(best)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", help="--log files of `neuralil-fast train`")
    p.add_argument("--out", default="learning_curve.png")
    p.add_argument("--at", type=float, nargs="+", default=[1, 2, 5, 10, 20, 30],
                   help="minutes at which to tabulate")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for path in args.logs:
        log = json.loads(Path(path).read_text())
        ep = log["epochs"]
        minutes = [e["wall_time_s"] / 60 for e in ep]
        f_all = [e["valid"]["all"]["force_mae_mev_A"] for e in ep]
        name = Path(path).parent.name or Path(path).stem
        ax.plot(minutes, f_all, lw=0.6, label=f"{name}: all validation")
        series = {"F all": f_all,
                  "E all": [e["valid"]["all"]["energy_mae_mev_atom"] for e in ep]}
        if ep and "without_outliers" in ep[0]["valid"]:
            f_wo = [e["valid"]["without_outliers"]["force_mae_mev_A"] for e in ep]
            ax.plot(minutes, f_wo, lw=0.6, label=f"{name}: without {log.get('outliers')}")
            series["F w/o"] = f_wo
            series["E w/o"] = [e["valid"]["without_outliers"]["energy_mae_mev_atom"] for e in ep]
        kept = kept_so_far(f_all)
        print(f"{path}: validation MAE of the kept model (forces meV/Å, energies meV/atom)")
        print("| minutes | epochs | kept epoch | " + " | ".join(series) + " |")
        print("|---" * (len(series) + 3) + "|")
        for t in args.at:
            k = max((i for i, m in enumerate(minutes) if m <= t), default=None)
            if k is None:
                continue
            j = kept[k]
            print(f"| {t:g} | {ep[k]['epoch']} | {ep[j]['epoch']} | " +
                  " | ".join(f"{series[s][j]:.1f}" for s in series) + " |")
    ax.set(xlabel="training wall time (min)", ylabel="validation force MAE (meV/Å)",
           yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
