"""Parity plots (predicted vs reference), like the NeuralIL article's Figure 3.

matplotlib is optional: :func:`require_matplotlib` raises a one-line error naming
the package when it is missing (call it before training starts).
"""
from __future__ import annotations

import numpy as np

__all__ = ["require_matplotlib", "parity_plot"]


def require_matplotlib():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ValueError("--parity needs matplotlib (pip install matplotlib), "
                         "or leave --parity out") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def parity_plot(path, forces_ref, forces_pred, energy_ref, energy_pred, title=None,
                highlight=None):
    """Write a two-panel PNG: force components (eV/Å) and energies per atom (eV/atom).

    forces_*: (M, 3) or flat arrays of the atoms with force labels (M may be 0);
    energy_*: (C,) per-atom energies.
    highlight: optional (C,) bool, configurations drawn in another colour (outliers).
    """
    plt = require_matplotlib()
    fr, fp = np.ravel(forces_ref), np.ravel(forces_pred)
    er, ep = np.asarray(energy_ref, float), np.asarray(energy_pred, float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    ax = axes[0]
    if fr.size:
        ax.scatter(fr, fp, s=2, alpha=0.35, color="tab:blue", rasterized=True)
        lim = [min(fr.min(), fp.min()), max(fr.max(), fp.max())]
        ax.plot(lim, lim, "k--", lw=0.8)
        mae = 1e3 * np.mean(np.abs(fp - fr))
        ax.set_title(f"forces: MAE {mae:.1f} meV/Å")
    else:
        ax.text(0.5, 0.5, "no force labels", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("forces")
    ax.set_xlabel("reference force component (eV/Å)")
    ax.set_ylabel("predicted force component (eV/Å)")
    ax = axes[1]
    hl = np.zeros(len(er), bool) if highlight is None else np.asarray(highlight, bool)
    ax.scatter(er[~hl], ep[~hl], s=14, color="tab:orange", label="configurations")
    if hl.any():
        ax.scatter(er[hl], ep[hl], s=24, marker="x", color="tab:red", label="outliers")
        ax.legend(loc="upper left")
    lim = [min(er.min(), ep.min()), max(er.max(), ep.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    mae = 1e3 * np.mean(np.abs(ep - er))
    ax.set_xlabel("reference energy (eV/atom)")
    ax.set_ylabel("predicted energy (eV/atom)")
    ax.set_title(f"energies: MAE {mae:.2f} meV/atom")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
