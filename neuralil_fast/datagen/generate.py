"""Sampling pipeline for GFN2-xTB reference data of liquid EAN.

One *chain* per temperature: pack a fresh box of ``n_pairs`` ion pairs
(:func:`neuralil_fast.datagen.ean.pack_box`), relax it for a few FIRE steps,
run a short xTB Langevin MD, and keep every ``sample_every``-th MD frame; each
kept MD frame also gives ``n_rattle`` rattled copies (Gaussian displacements
of every atom) and ``n_strain`` strained copies (random symmetric strain with
components in ±``max_strain``, atoms scaled with the cell).  Every kept frame
carries GFN2-xTB energy, forces and stress: MD frames the values the MD step
computed, copies a fresh calculation.  The tblite calculators start every
calculation from the atomic guess (``cache_api=False``), so a label does not
depend on what was computed before it.

Randomness: a single ``numpy.random.default_rng(seed)`` spawns one child
generator per chain, and each chain draws everything (packing, velocities,
Langevin noise, rattles, strains) from its own child in a fixed order.  With
one OpenMP thread per process (enforced here) tblite is bit-reproducible, so
a rerun with the same seed gives identical frames and labels, whether the
chains run one after another or in parallel worker processes.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from ase import Atoms, units

from . import ean
from . import label as xlabel

KINDS = ("md", "rattle", "strain")


@dataclass
class GeneratorConfig:
    """Parameters of :func:`generate` (all recorded with the data)."""

    n_pairs: int = 4
    n_configs: int = 300
    seed: int = 0
    temperatures: Sequence[float] = (300.0, 400.0, 500.0, 600.0)
    density: float = ean.EAN_DENSITY
    relax_steps: int = 5         # FIRE steps on the packed box (0: none)
    relax_fmax: float = 0.5      # eV/Å, FIRE stops earlier when reached
    equil_steps: int = 5         # MD steps before the first kept frame
    sample_every: int = 4        # keep every n-th MD step after that
    timestep_fs: float = 1.0
    friction_per_fs: float = 0.02
    n_rattle: int = 3            # rattled copies per kept MD frame
    rattle_std: float = 0.05     # Å
    n_strain: int = 2            # strained copies per kept MD frame
    max_strain: float = 0.03
    accuracy: float = xlabel.XTB_SETTINGS["accuracy"]  # tblite SCF accuracy (its default: 1.0)
    electronic_temperature: float = 300.0  # K, tblite default
    threads: int = 1             # OpenMP threads per process (1: bit-reproducible)

    def __post_init__(self):
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures:
            raise ValueError("at least one temperature is needed")
        if self.n_pairs < 1 or self.n_configs < 1:
            raise ValueError("n_pairs and n_configs must be positive")
        if self.sample_every < 1:
            raise ValueError("sample_every must be at least 1")
        if min(self.n_rattle, self.n_strain, self.relax_steps, self.equil_steps) < 0:
            raise ValueError("step and copy counts must not be negative")
        positive = [("temperatures", t) for t in self.temperatures] + [
            ("density", self.density), ("relax_fmax", self.relax_fmax),
            ("timestep_fs", self.timestep_fs), ("friction_per_fs", self.friction_per_fs),
            ("accuracy", self.accuracy)]
        for name, value in positive:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (self.rattle_std >= 0 and math.isfinite(self.rattle_std)):
            raise ValueError(f"rattle_std must be >= 0 Å, got {self.rattle_std}")
        # below 1/3 the strained cell (I + eps) is diagonally dominant: never singular
        if not 0 <= self.max_strain < 1 / 3:
            raise ValueError(f"max_strain must be in [0, 1/3), got {self.max_strain}")
        if not self.electronic_temperature >= 0:
            raise ValueError(f"electronic_temperature must be >= 0 K, got "
                             f"{self.electronic_temperature}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def per_md_frame(self) -> int:
        return 1 + self.n_rattle + self.n_strain

    def chain_targets(self) -> list[int]:
        """Number of frames each chain (temperature) contributes."""
        n = len(self.temperatures)
        base, extra = divmod(self.n_configs, n)
        return [base + (1 if i < extra else 0) for i in range(n)]

    def expected_calls(self) -> int:
        """Upper bound of the xTB single points the whole run needs."""
        calls = 0
        for target in self.chain_targets():
            if target == 0:
                continue
            n_md = math.ceil(target / self.per_md_frame)
            calls += self.relax_steps + 1 + self.equil_steps + n_md * self.sample_every
            calls += target - n_md
        return calls

    def as_dict(self) -> dict:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        return d


def _random_strain(rng: np.random.Generator, max_strain: float) -> np.ndarray:
    """Symmetric strain tensor with every component uniform in ±max_strain."""
    e = rng.uniform(-max_strain, max_strain, size=(3, 3))
    return np.triu(e) + np.triu(e, 1).T


def _calculator(cfg: GeneratorConfig):
    return xlabel.make_calculator(accuracy=cfg.accuracy,
                                  electronic_temperature=cfg.electronic_temperature,
                                  cache_api=False)


def _frame(atoms: Atoms, results: dict, info: dict) -> Atoms:
    out = atoms.copy()
    out.calc = None
    out.arrays.pop("momenta", None)
    out.info = dict(info)
    out.wrap()
    return xlabel.attach(out, results)


def run_chain(cfg: GeneratorConfig, chain: int, rng: np.random.Generator,
              progress: Callable[[int], None] | None = None) -> list[Atoms]:
    """Frames of one chain (temperature ``cfg.temperatures[chain]``)."""
    from ase.md.langevin import Langevin
    from ase.md import velocitydistribution as vd
    from ase.optimize import FIRE

    from ..md import thermalize

    xlabel.set_threads(cfg.threads)
    tick = progress or (lambda n: None)
    target = cfg.chain_targets()[chain]
    temperature = cfg.temperatures[chain]
    if target == 0:
        return []

    atoms = ean.pack_box(cfg.n_pairs, rng, density=cfg.density)
    atoms.info.clear()
    md_calc = _calculator(cfg)
    atoms.calc = md_calc

    def counted(fn):
        def wrapper(*a, **k):
            tick(1)
            return fn(*a, **k)
        return wrapper

    # Count every real xTB call through the calculator's calculate method.
    md_calc.calculate = counted(md_calc.calculate)

    if cfg.relax_steps > 0:
        FIRE(atoms, logfile=None).run(fmax=cfg.relax_fmax, steps=cfg.relax_steps)

    thermalize(atoms, temperature, rng)
    vd.Stationary(atoms)
    dyn = Langevin(atoms, timestep=cfg.timestep_fs * units.fs, temperature_K=temperature,
                   friction=cfg.friction_per_fs / units.fs, rng=rng,
                   fixcm=False)  # a drifting centre of mass is harmless here
    if cfg.equil_steps:
        dyn.run(cfg.equil_steps)

    copy_calc = _calculator(cfg)
    copy_calc.calculate = counted(copy_calc.calculate)
    frames: list[Atoms] = []
    step = cfg.equil_steps
    while len(frames) < target:
        dyn.run(cfg.sample_every)
        step += cfg.sample_every
        # Langevin computed energy, forces and stress at the current positions.
        results = {"energy": atoms.get_potential_energy(),
                   "forces": atoms.get_forces(),
                   "stress": atoms.get_stress(voigt=True)}
        base_info = {"chain": chain, "temperature": temperature, "md_step": step,
                     "time_fs": step * cfg.timestep_fs}
        md_frame = _frame(atoms, results, {"kind": "md", **base_info,
                                           "kinetic_temperature":
                                               float(atoms.get_temperature())})
        frames.append(md_frame)
        parent = len(frames) - 1
        snapshot = atoms.copy()
        snapshot.calc = None
        snapshot.set_velocities(np.zeros((len(snapshot), 3)))
        for _ in range(cfg.n_rattle):
            if len(frames) >= target:
                break
            copy = snapshot.copy()
            copy.positions += rng.normal(0.0, cfg.rattle_std, size=copy.positions.shape)
            res = xlabel.compute(copy, copy_calc)
            frames.append(_frame(copy, res, {"kind": "rattle", **base_info,
                                             "parent_in_chain": parent,
                                             "rattle_std": cfg.rattle_std}))
        for _ in range(cfg.n_strain):
            if len(frames) >= target:
                break
            copy = snapshot.copy()
            eps = _random_strain(rng, cfg.max_strain)
            copy.set_cell(copy.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            res = xlabel.compute(copy, copy_calc)
            frames.append(_frame(copy, res, {
                "kind": "strain", **base_info, "parent_in_chain": parent,
                "strain_voigt": eps.flat[[0, 4, 8, 5, 2, 1]].copy()}))
    return frames


# --- worker-process plumbing -------------------------------------------------

_QUEUE = None


def _init_worker(queue, threads):
    global _QUEUE
    _QUEUE = queue
    xlabel.set_threads(threads)


def _worker(args):
    cfg_dict, chain, rng = args
    cfg = GeneratorConfig(**cfg_dict)
    frames = run_chain(cfg, chain, rng, progress=lambda n: _QUEUE.put(n))
    return chain, frames


def provenance(cfg: GeneratorConfig) -> dict:
    """Flat key -> value provenance written into every frame's info."""
    info = {"method": "GFN2-xTB", "code": "tblite", "seed": int(cfg.seed)}
    for k, v in xlabel.versions().items():
        info[f"{k}_version"] = v
    info["omp_num_threads"] = str(cfg.threads)
    info["xtb_accuracy"] = cfg.accuracy
    info["xtb_electronic_temperature"] = cfg.electronic_temperature
    for k, v in cfg.as_dict().items():
        if k in ("seed", "accuracy", "electronic_temperature", "threads"):
            continue
        info[f"gen_{k}"] = np.array(v, dtype=float) if isinstance(v, list) else v
    return info


def generate(cfg: GeneratorConfig, jobs: int = 1, progress: bool | Callable = False,
             ) -> list[Atoms]:
    """Run all chains and return the labelled frames (chain by chain).

    ``jobs > 1`` runs chains in that many worker processes (same results as
    ``jobs=1``).  ``progress`` is ``True`` for a tqdm bar on stderr or a
    callable taking the number of xTB calls done since the last call.
    """
    xlabel._import_tblite_ase()  # fail early with the install hint
    root = np.random.default_rng(cfg.seed)
    rngs = root.spawn(len(cfg.temperatures))
    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.expected_calls(), unit="xTB", desc="make-data", smoothing=0.1)
        tick = bar.update
    elif callable(progress):
        tick = progress
    else:
        tick = lambda n: None  # noqa: E731

    chains = list(range(len(cfg.temperatures)))
    results: dict[int, list[Atoms]] = {}
    try:
        if jobs <= 1 or len(chains) == 1:
            xlabel.set_threads(cfg.threads)
            for c in chains:
                results[c] = run_chain(cfg, c, rngs[c], progress=tick)
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            with ctx.Pool(min(jobs, len(chains)), initializer=_init_worker,
                          initargs=(queue, cfg.threads)) as pool:
                pending = pool.map_async(_worker, [(cfg.as_dict(), c, rngs[c]) for c in chains])
                while not pending.ready():
                    try:
                        tick(queue.get(timeout=0.5))
                    except Exception:  # queue.Empty
                        pass
                for c, frames in pending.get():
                    results[c] = frames
                while not queue.empty():
                    tick(queue.get())
    finally:
        if bar is not None:
            bar.close()

    prov = provenance(cfg)
    frames: list[Atoms] = []
    for c in chains:
        offset = len(frames)
        for f in results[c]:
            f.info.update(prov)
            if "parent_in_chain" in f.info:
                f.info["parent"] = offset + int(f.info.pop("parent_in_chain"))
            frames.append(f)
    for i, f in enumerate(frames):
        f.info["frame"] = i
    return frames


def write_extxyz(frames: Sequence[Atoms], path) -> None:
    """Write frames (energy, stress and info in the comment line, forces per atom)."""
    import ase.io
    ase.io.write(str(path), list(frames), format="extxyz")


def summary(frames: Sequence[Atoms]) -> dict:
    """Counts and label statistics of a set of frames."""
    energies = np.array([f.get_potential_energy() for f in frames])
    n_atoms = np.array([len(f) for f in frames])
    forces = np.concatenate([f.get_forces().ravel() for f in frames])
    stresses = np.array([f.get_stress(voigt=True) for f in frames])
    kinds = [f.info.get("kind", "unknown") for f in frames]
    return {
        "n_frames": len(frames),
        "n_atoms": sorted(set(int(n) for n in n_atoms)),
        "species": sorted(set(s for f in frames for s in f.get_chemical_symbols())),
        "frames_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
        "energy_mean_eV": float(energies.mean()),
        "energy_std_eV": float(energies.std()),
        "energy_per_atom_std_eV": float((energies / n_atoms).std()),
        "force_std_eV_per_A": float(forces.std()),
        "force_max_abs_eV_per_A": float(np.abs(forces).max()),
        "stress_std_eV_per_A3": float(stresses.std()),
    }


def timed_generate(cfg: GeneratorConfig, jobs: int = 1, progress=False):
    """:func:`generate` and its wall time in seconds."""
    t0 = time.perf_counter()
    frames = generate(cfg, jobs=jobs, progress=progress)
    return frames, time.perf_counter() - t0
