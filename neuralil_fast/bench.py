"""``neuralil-fast bench``: the speed table of this machine.

The article's model (random parameters: the speed does not depend on their values) on
the bundled EAN boxes (60 atoms, replicated n x n x n), each backend side by side:

- ``neighbours``: building the neighbour list on the host (``neighbors.allocate``, skin 0.5 Å);
- ``forces``: one jitted energy + forces + stress evaluation (the force call of an MD step);
- ``md``: one velocity-Verlet step through ``nf.Calculator`` (list update and ASE included);
- ``training``: one jitted AdamW step on 8 bundled configurations, energy + force loss.

Each time is the minimum over ``--repeat`` calls after one untimed call (compilation).
The forces of every backend are compared with the reference backend's on the same
input, so the table also says that the backends agree.  The reference backend builds its
neighbour lists densely (O(N^2): 44 s for 3 840 atoms here), so its list and MD rows stop
at ``REFERENCE_MAX_ATOMS``; its forces run on the list another backend built.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import numpy as np

TASKS = ("neighbours", "forces", "md", "training")
TASK_LABELS = {"neighbours": "neighbour list (build)", "forces": "energy + forces + stress",
               "md": "MD step (ASE)", "training": "training step (8 configs)"}
TRAINING_BATCH = 8
REFERENCE_MAX_ATOMS = 2000


def add_arguments(p) -> None:
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to time (default: reference, numba, and triton with a GPU)")
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4],
                   help="n: the 60-atom box repeated n x n x n (default 2 4: 480 and 3 840 atoms)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--repeat", type=int, default=5, help="timed calls per entry (the minimum)")
    p.add_argument("--json", help="also write the table (and the machine) to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def machine() -> dict:
    """Processor, cores, accelerator and versions, for the table's header."""
    import importlib.metadata as md

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "numba", "triton", "jax-triton", "ase"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    gpus = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpus or None, "versions": versions}


def _backends(names) -> list[str]:
    from .backends import resolve_backend, triton_available
    from .kernels_api import numba_available

    if names is None:
        names = ["reference"] + (["numba"] if numba_available() else []) + \
            (["triton"] if triton_available() else [])
    out = []
    for name in names:
        b = resolve_backend(name)          # ValueError naming an unknown or absent one
        if b not in out:
            out.append(b)
    return out


def _list_builder(backend: str) -> str:
    """The backend that builds the lists the forces task evaluates on (the same pairs
    whoever builds them; the reference backend's dense build is slow for large N)."""
    from .backends import resolve_backend

    return resolve_backend("auto") if backend == "reference" else backend


def _min_time(fn, repeat: int) -> tuple[float, object]:
    """(minimum seconds over ``repeat`` calls after one untimed call, the last result)."""
    import jax

    out = jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def _box(replicas: int):
    from ase.io import read

    from .demo import bundled_data

    return read(bundled_data(), index=0).repeat((replicas,) * 3)


def _time_system(task, model, params, atoms, backend, dtype, repeat):
    """(seconds, forces (N, 3) float64 or None) of ``task`` on ``atoms``."""
    import jax.numpy as jnp

    from .geometry import species_indices
    from .neighbors import allocate

    pos, cell, pbc = atoms.get_positions(), atoms.cell.array, atoms.pbc
    if task == "neighbours":
        t, _ = _min_time(lambda: allocate(pos, cell, pbc, model.r_cut, 0.5, backend=backend),
                         repeat)
        return t, None
    if task == "forces":
        from .potential import evaluate_jit

        nl = allocate(pos, cell, pbc, model.r_cut, backend=_list_builder(backend))
        dt = jnp.dtype(dtype)
        args = (model, params, jnp.asarray(pos, dt), jnp.asarray(cell, dt),
                jnp.asarray(species_indices(atoms.numbers, model.species)), nl.centers,
                nl.neighbors, nl.shifts)
        t, out = _min_time(lambda: evaluate_jit(*args, backend=backend, stress=True), repeat)
        return t, np.asarray(out["forces"], np.float64)
    # md: the calculator's whole step; the velocities drawn alike for every backend
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from .calculator import Calculator
    from .md import thermalize

    atoms = atoms.copy()
    atoms.calc = Calculator(model, params, backend=backend, dtype=dtype)
    thermalize(atoms, 300.0, np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(1)  # the list's jitted update compiles in the second step
    t, _ = _min_time(lambda: dyn.run(1), repeat)
    return t, None


def _time_training(model, backend, dtype, repeat):
    """(seconds, atoms) of one AdamW step on the first 8 bundled configurations."""
    import jax.numpy as jnp

    from .demo import bundled_data
    from .io import read_dataset
    from .training.data import pad_configurations
    from .training.loop import TrainConfig, Trainer

    configs = read_dataset(bundled_data())[:TRAINING_BATCH]
    n = len(configs)
    data = pad_configurations(configs, model.species, model.r_cut, backend, np.dtype(dtype))
    trainer = Trainer(model, data, None, TrainConfig(batch_size=n, backend=backend,
                                                     fit_offset=False))
    state = trainer.init_state()
    dt = jnp.dtype(dtype)
    args = (jnp.arange(n, dtype=jnp.int32), jnp.ones(n, dt), jnp.asarray(1e-3, dt))
    t, _ = _min_time(lambda: trainer._step(state.params, state.opt_state, trainer.train,
                                           *args)[0], repeat)
    return t, sum(c.n_atoms for c in configs)


def measure(backends, replicas, tasks, dtype="float32", repeat=5, progress=True) -> list[dict]:
    """Rows {task, atoms, backend, seconds[, max_force_difference_eV_A]} (see the module)."""
    import jax

    from tqdm import tqdm

    from .model import NeuralIL

    model = NeuralIL(species=("C", "H", "N", "O"))
    jobs = [(t, r, b) for t in tasks if t != "training" for r in replicas for b in backends]
    jobs += [("training", None, b) for b in backends if "training" in tasks]
    rows, forces = [], {}
    with jax.enable_x64(dtype == "float64"):
        params = model.init(jax.random.key(0), jax.numpy.dtype(dtype))
        for task, rep, backend in tqdm(jobs, desc="bench", disable=not progress,
                                       file=sys.stderr, leave=False):
            if task == "training":
                seconds, n = _time_training(model, backend, dtype, repeat)
                rows.append({"task": task, "atoms": n, "backend": backend,
                             "seconds": seconds})
                continue
            atoms = _box(rep)
            if backend == "reference" and task != "forces" and len(atoms) > REFERENCE_MAX_ATOMS:
                continue
            seconds, F = _time_system(task, model, params, atoms, backend, dtype, repeat)
            rows.append({"task": task, "atoms": len(atoms), "backend": backend,
                         "seconds": seconds})
            if F is not None:
                forces[task, len(atoms), backend] = F
    for row in rows:
        key = (row["task"], row["atoms"])
        if (*key, "reference") in forces and (*key, row["backend"]) in forces:
            row["max_force_difference_eV_A"] = float(np.max(np.abs(
                forces[(*key, row["backend"])] - forces[(*key, "reference")])))
    return rows


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(rows, backends, info, dtype, repeat) -> str:
    gpu = ", ".join(info["gpu"]) if info["gpu"] else "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [f"neuralil-fast bench: {info['cpu']}, {info['cores']} CPUs, {gpu}",
             f"  {versions}",
             f"  {dtype}; the article's model on the bundled EAN boxes; each time the minimum "
             f"of {repeat} calls after a compiling one",
             ""]
    others = [b for b in backends if b != "reference"]
    head = f"{'task':<28}{'atoms':>7}" + "".join(f"{b:>14}" for b in backends)
    if "reference" in backends:
        head += "".join(f"{b + ' speed-up':>18}" for b in others)
    lines.append(head)
    keys = list(dict.fromkeys((r["task"], r["atoms"]) for r in rows))
    for task, n in keys:
        got = {r["backend"]: r for r in rows if (r["task"], r["atoms"]) == (task, n)}
        line = f"{TASK_LABELS[task]:<28}{n:>7}" + "".join(
            f"{_fmt_time(got[b]['seconds']) if b in got else 'skipped':>14}" for b in backends)
        if "reference" in backends:
            line += "".join(
                f"{got['reference']['seconds'] / got[b]['seconds']:>17.1f}x"
                if "reference" in got and b in got else f"{'n/a':>18}" for b in others)
        lines.append(line)
    if any(r["atoms"] > REFERENCE_MAX_ATOMS for r in rows) and "reference" in backends:
        lines.append(f"(skipped: the reference backend's dense list build above "
                     f"{REFERENCE_MAX_ATOMS} atoms)")
    md_rows = [r for r in rows if r["task"] == "md"]
    if md_rows:
        best = min(md_rows, key=lambda r: r["seconds"] / r["atoms"])
        lines.append(f"\nMD: up to {best['atoms'] / best['seconds']:,.0f} atom-steps/s "
                     f"({best['backend']}, {best['atoms']} atoms)")
    diffs = [r["max_force_difference_eV_A"] for r in rows
             if r["backend"] != "reference" and "max_force_difference_eV_A" in r]
    if diffs and "reference" in backends:
        lines.append(f"forces against the reference backend on the same input: max "
                     f"|difference| {max(diffs):.2g} eV/Å")
    return "\n".join(lines)


def run(args) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if any(r < 1 for r in args.replicas):
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: folder {os.path.dirname(os.path.abspath(args.json))} "
                         "does not exist")
    backends = _backends(args.backends)
    info = machine()
    rows = measure(backends, args.replicas, args.tasks, args.dtype, args.repeat,
                   progress=not args.no_progress)
    print(table(rows, backends, info, args.dtype, args.repeat))
    if args.json:
        from .io import _atomic_write_bytes

        _atomic_write_bytes(args.json, json.dumps(
            {"machine": info, "dtype": args.dtype, "repeat": args.repeat, "rows": rows},
            indent=2).encode())
    return 0
