"""``neuralil-fast evaluate MODEL DATA``: energy and force errors of a model on a data set.

Energies in meV/atom, forces in meV/Å; overall and per element; optionally
after removing the mean energy offset (for models trained on forces only).
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .geometry import species_indices

__all__ = ["predict", "error_metrics", "load_any_model", "padded_size"]


def load_any_model(path):
    """(model, params, K) from an ``nf.save`` file (a committee's: K members, params with
    the leading axis K) or an original NeuralIL parameter pickle (K None: one model)."""
    from .committee import load_any
    from .model import from_neuralil

    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return (*from_neuralil(path), None)
    return load_any(path)


# Up to this many distinct atom counts compile one evaluation each; more are padded to
# the size ladder (see padded_size), so a data set of many sizes compiles a few times per
# doubling of the atom count instead of once per count.
EXACT_SIZES = 4


def padded_size(n: int) -> int:
    """The atom count ``n`` is padded to with many sizes: four steps per doubling (at
    most 25% padding atoms); counts up to 8 stay as they are."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def predict(model, params, configs, backend="auto", dtype="float64", progress=False,
            committee: bool = False):
    """Energies (n_configs,) eV and forces [(N, 3)] eV/Å for a list of ``io.Configuration``.

    committee: ``params`` carry a leading axis K (``save_committee``): the members' mean,
    and a third result, the spread: {"energy": (n_configs,) eV, standard deviation over
    members; "forces": [(N,)] eV/Å, sqrt(mean_k |F_k - F_mean|^2) per atom}.

    Pair arrays are padded to a common capacity; one compilation per distinct atom count
    up to ``EXACT_SIZES`` counts, else per rung of :func:`padded_size` (padding atoms:
    no pairs, their energies left out).
    """
    from .committee import committee_evaluate_jit
    from .neighbors import allocate
    from .potential import evaluate_jit

    run = committee_evaluate_jit if committee else evaluate_jit
    energies, forces, spread = [], [], {"energy": [], "forces": []}
    ladder = len({c.n_atoms for c in configs}) > EXACT_SIZES
    with jax.enable_x64(dtype == "float64"):
        lists = [allocate(c.positions, c.cell, c.pbc, model.r_cut, backend=backend,
                          capacity_multiplier=1.0) for c in configs]
        capacity = max(nl.capacity for nl in lists)
        dt = jnp.float64 if dtype == "float64" else jnp.float32
        it = zip(configs, lists)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(configs), desc="evaluate", file=sys.stderr)
        for c, nl in it:
            if nl.capacity != capacity:
                nl = allocate(c.positions, c.cell, c.pbc, model.r_cut, backend=backend,
                              capacity=capacity)
            sp = species_indices(c.numbers, model.species)
            n = c.n_atoms
            pad = padded_size(n) - n if ladder else 0
            # Padding atoms have no pairs: their descriptors, hence their energies, do not
            # depend on any position, so the real atoms' forces are exact and the energy
            # is the sum over the real atoms.
            out = run(
                model, params, jnp.asarray(np.concatenate([c.positions, np.zeros((pad, 3))]), dt),
                jnp.asarray(c.cell, dt), jnp.asarray(np.concatenate([sp, np.zeros(pad, sp.dtype)])),
                # padding pair rows point at the padding index of the padded system
                jnp.where(nl.centers >= n, n + pad, nl.centers),
                jnp.where(nl.neighbors >= n, n + pad, nl.neighbors), nl.shifts,
                backend=backend, stress=False)
            # members outermost for a committee: e (K,), f (K, n, 3)
            e = np.asarray(jnp.sum(out["energies"][..., :n], axis=-1) if pad else out["energy"],
                           np.float64)
            f = np.asarray(out["forces"][..., :n, :], np.float64)
            if committee:
                spread["energy"].append(float(e.std()))
                spread["forces"].append(np.sqrt(np.mean(np.sum((f - f.mean(0)) ** 2, -1), 0)))
                e, f = e.mean(), f.mean(0)
            energies.append(float(e))
            forces.append(f)
    if committee:
        return np.array(energies), forces, {"energy": np.array(spread["energy"]),
                                            "forces": spread["forces"]}
    return np.array(energies), forces


def kept_indices(n_configs: int, exclude=()) -> list[int]:
    """Indices 0..n_configs-1 without ``exclude``; ValueError if one is out of range or none is left."""
    bad = sorted({int(k) for k in exclude if not 0 <= k < n_configs})
    if bad:
        raise ValueError(f"--exclude: indices {bad} are outside 0..{n_configs - 1}")
    keep = [k for k in range(n_configs) if k not in set(exclude)]
    if not keep:
        raise ValueError("--exclude leaves no configuration to evaluate")
    return keep


def error_metrics(configs, energies, forces, remove_offset=False, exclude=(), spread=None,
                  per_config=False):
    """dict of MAE/RMSE: energy (meV/atom), forces (meV/Å), per-element force errors.

    Force entries cover the kept configurations that carry forces (``n_configs_forces``);
    where none does, they are absent.  ``spread`` (a committee's, from :func:`predict`)
    adds "committee": the mean energy spread (meV/atom) and per-atom force spread (meV/Å),
    and the Spearman rank correlation of the per-atom force spread with the per-atom force
    error |F_mean - F_ref| (how well the spread ranks the error).  ``per_config`` adds
    "per_config": each kept configuration's index, atoms, energy error (meV/atom, after
    the offset) and, where known, force MAE and mean force spread (meV/Å).
    """
    keep = kept_indices(len(configs), exclude)
    n_atoms = np.array([configs[k].n_atoms for k in keep])
    de = np.array([(energies[k] - configs[k].energy) for k in keep]) / n_atoms * 1000.0
    offset = float(de.mean()) if remove_offset else 0.0
    de = de - offset
    with_forces = [k for k in keep if configs[k].forces is not None]
    dF = {k: (forces[k] - configs[k].forces) * 1000.0 for k in with_forces}  # meV/Å
    out = {
        "n_configs": len(keep),
        "n_configs_forces": len(with_forces),
        "energy_offset_meV_per_atom": offset,
        "energy_mae_meV_per_atom": float(np.abs(de).mean()),
        "energy_rmse_meV_per_atom": float(np.sqrt((de**2).mean())),
        "per_element": {},
    }
    if spread is not None:
        out["committee"] = {
            "energy_spread_mean_meV_per_atom": float(np.mean(
                [1000.0 * spread["energy"][k] / configs[k].n_atoms for k in keep])),
            "force_spread_mean_meV_per_A": float(1000.0 * np.mean(
                np.concatenate([spread["forces"][k] for k in keep])))}
    if per_config:
        out["per_config"] = []
        for k, e in zip(keep, de):
            row = {"index": k, "n_atoms": configs[k].n_atoms, "energy_error_meV_per_atom":
                   float(e)}
            if k in dF:
                row["force_mae_meV_per_A"] = float(np.abs(dF[k]).mean())
            if spread is not None:
                row["force_spread_mean_meV_per_A"] = float(1000.0 * spread["forces"][k].mean())
            out["per_config"].append(row)
    if not with_forces:
        return out
    df = np.concatenate([dF[k] for k in with_forces])
    if spread is not None and len(df) >= 3:
        from scipy.stats import spearmanr

        atom_spread = np.concatenate([spread["forces"][k] for k in with_forces])
        out["committee"]["spearman_force_spread_vs_error"] = float(
            spearmanr(atom_spread, np.linalg.norm(df, axis=-1)).statistic)
    symbols = np.concatenate([np.asarray(configs[k].symbols) for k in with_forces])
    out["force_mae_meV_per_A"] = float(np.abs(df).mean())
    out["force_rmse_meV_per_A"] = float(np.sqrt((df**2).mean()))
    for s in sorted(set(symbols.tolist())):
        d = df[symbols == s]
        out["per_element"][s] = {"force_mae_meV_per_A": float(np.abs(d).mean()),
                                 "force_rmse_meV_per_A": float(np.sqrt((d**2).mean()))}
    return out


def format_table(m: dict) -> str:
    lines = [f"configurations: {m['n_configs']}"]
    if m["n_configs_forces"] < m["n_configs"]:
        lines[0] += f" ({m['n_configs_forces']} with forces)"
    if m["energy_offset_meV_per_atom"]:
        lines.append(f"energy offset removed: {m['energy_offset_meV_per_atom']:+.3f} meV/atom")
    lines += [
        f"{'quantity':<22}{'MAE':>12}{'RMSE':>12}",
        f"{'energy (meV/atom)':<22}{m['energy_mae_meV_per_atom']:>12.3f}{m['energy_rmse_meV_per_atom']:>12.3f}",
    ]
    if "force_mae_meV_per_A" not in m:
        lines.append(f"{'forces (meV/Å)':<22}{'n/a':>12}{'n/a':>12}")
        return "\n".join(lines)
    lines.append(f"{'forces (meV/Å)':<22}{m['force_mae_meV_per_A']:>12.2f}{m['force_rmse_meV_per_A']:>12.2f}")
    for s, e in m["per_element"].items():
        lines.append(f"{'  forces on ' + s:<22}{e['force_mae_meV_per_A']:>12.2f}{e['force_rmse_meV_per_A']:>12.2f}")
    return "\n".join(lines + _committee_lines(m) + _worst_lines(m))


WORST_SHOWN = 10


def _worst_lines(m: dict) -> list[str]:
    """The configurations with the largest force MAE (else energy error), at most
    ``WORST_SHOWN`` (the JSON holds them all)."""
    rows = m.get("per_config")
    if not rows:
        return []
    key = "force_mae_meV_per_A" if any("force_mae_meV_per_A" in r for r in rows) else None
    worst = sorted(rows, key=lambda r: -(r.get(key, -1.0) if key else
                                         abs(r["energy_error_meV_per_atom"])))[:WORST_SHOWN]
    spread = "force_spread_mean_meV_per_A" in rows[0]
    lines = [f"largest errors ({len(worst)} of {len(rows)} configurations):",
             f"{'  index':<9}{'atoms':>7}{'dE (meV/atom)':>15}{'force MAE':>11}"
             + (f"{'spread':>9}" if spread else "")]
    for r in worst:
        f = f"{r['force_mae_meV_per_A']:.2f}" if "force_mae_meV_per_A" in r else "n/a"
        lines.append(f"  {r['index']:<7}{r['n_atoms']:>7}{r['energy_error_meV_per_atom']:>+15.3f}"
                     f"{f:>11}" + (f"{r['force_spread_mean_meV_per_A']:>9.2f}" if spread else ""))
    return lines


def _committee_lines(m: dict) -> list[str]:
    if "committee" not in m:
        return []
    c = m["committee"]
    lines = [f"committee of {m['committee_size']} (errors of the members' mean); spread "
             "over members (standard deviation), on average:",
             f"  energy {c['energy_spread_mean_meV_per_atom']:.3f} meV/atom, forces "
             f"{c['force_spread_mean_meV_per_A']:.2f} meV/Å per atom"]
    if "spearman_force_spread_vs_error" in c:
        lines.append("  per-atom force spread vs |force error|: Spearman rho "
                     f"{c['spearman_force_spread_vs_error']:.3f}")
    return lines


def add_arguments(p):
    p.add_argument("model", help="model file (nf.save) or an original NeuralIL parameter pickle")
    p.add_argument("data", help="extxyz (or anything ASE reads with energies, and forces where "
                                "known) or NeuralIL JSON Lines")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--species-sequence", help="JSON Lines only: a types file, or the symbols separated by commas")
    g.add_argument("--ean-pairs", type=int, help="JSON Lines only: EAN with this many ion pairs (cations first)")
    p.add_argument("--remove-offset", action="store_true",
                   help="subtract the mean energy error (models trained on forces only)")
    p.add_argument("--exclude", type=int, nargs="*", default=[], help="configuration indices to leave out")
    p.add_argument("--backend", default="auto", help="reference | numba | triton | auto")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--per-config", action="store_true",
                   help="also each configuration's errors (all in the JSON; the table shows "
                        f"the {WORST_SHOWN} with the largest force MAE)")


def run(args) -> int:
    from .io import ean_species_sequence, read_dataset

    seq = None
    if args.ean_pairs:
        seq = ean_species_sequence(args.ean_pairs)
    elif args.species_sequence:
        seq = args.species_sequence.split(",") if "," in args.species_sequence else args.species_sequence
    model, params, size = load_any_model(args.model)
    configs = read_dataset(args.data, species_sequence=seq, species=model.species,
                           require_labels=("energy",))
    kept_indices(len(configs), args.exclude)  # before the (long) prediction
    t0 = time.perf_counter()
    got = predict(model, params, configs, backend=args.backend, dtype=args.dtype,
                  progress=not args.json, committee=size is not None)
    metrics = error_metrics(configs, *got[:2], remove_offset=args.remove_offset,
                            exclude=args.exclude, spread=got[2] if size else None,
                            per_config=args.per_config)
    if size is not None:
        metrics["committee_size"] = size
    metrics["seconds"] = time.perf_counter() - t0
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0
