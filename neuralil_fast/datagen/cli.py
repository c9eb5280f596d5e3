"""``neuralil-fast make-data``: GFN2-xTB reference data for liquid EAN."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .generate import GeneratorConfig

_DEFAULTS = GeneratorConfig()


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad temperature list {text!r}") from err
    if not temps or min(temps) <= 0:
        raise argparse.ArgumentTypeError("temperatures must be positive numbers in K")
    return temps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("--out", type=Path, default=Path("ean_xtb.xyz"),
                        help="output extxyz file (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="provenance summary (default: the --out path with .json)")
    parser.add_argument("--n-pairs", type=int, default=d.n_pairs,
                        help="ion pairs per periodic box (default: %(default)s)")
    parser.add_argument("--n-configs", type=int, default=d.n_configs,
                        help="labelled configurations in all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the one numpy Generator behind everything "
                             "(default: %(default)s)")
    parser.add_argument("--temperatures", type=_temperatures, default=d.temperatures,
                        help="MD temperatures in K, one chain each, comma separated "
                             "(default: %(default)s)")
    parser.add_argument("--timestep", type=float, default=d.timestep_fs,
                        help="MD time step in fs (default: %(default)s)")
    parser.add_argument("--sample-every", type=int, default=d.sample_every,
                        help="keep every n-th MD step (default: %(default)s)")
    parser.add_argument("--relax-steps", type=int, default=d.relax_steps,
                        help="FIRE steps on each packed box (default: %(default)s)")
    parser.add_argument("--equil-steps", type=int, default=d.equil_steps,
                        help="MD steps before the first kept frame (default: %(default)s)")
    parser.add_argument("--n-rattle", type=int, default=d.n_rattle,
                        help="rattled copies per kept MD frame (default: %(default)s)")
    parser.add_argument("--rattle-std", type=float, default=d.rattle_std,
                        help="rattle standard deviation in Å (default: %(default)s)")
    parser.add_argument("--n-strain", type=int, default=d.n_strain,
                        help="strained copies per kept MD frame (default: %(default)s)")
    parser.add_argument("--max-strain", type=float, default=d.max_strain,
                        help="largest strain component (default: %(default)s)")
    parser.add_argument("--accuracy", type=float, default=d.accuracy,
                        help="tblite SCF accuracy (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one chain each (same results; "
                             "default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    return GeneratorConfig(
        n_pairs=args.n_pairs, n_configs=args.n_configs, seed=args.seed,
        temperatures=args.temperatures, timestep_fs=args.timestep,
        sample_every=args.sample_every, relax_steps=args.relax_steps,
        equil_steps=args.equil_steps, n_rattle=args.n_rattle, rattle_std=args.rattle_std,
        n_strain=args.n_strain, max_strain=args.max_strain, accuracy=args.accuracy)


def run(args: argparse.Namespace) -> int:
    from . import generate as gen
    from . import label as xlabel

    cfg = config_from_args(args)
    if not xlabel.have_tblite():
        print(f"neuralil-fast make-data: {xlabel.INSTALL_HINT}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    print(f"make-data: {len(cfg.temperatures)} chain(s) at {list(cfg.temperatures)} K, "
          f"{cfg.n_pairs} ion pairs, {cfg.n_configs} frames, about "
          f"{cfg.expected_calls()} xTB calls, seed {cfg.seed}", file=sys.stderr, flush=True)
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    frames, wall = gen.timed_generate(cfg, jobs=args.jobs, progress=not args.no_progress)
    gen.write_extxyz(frames, out)
    info = {
        "file": out.name,
        "command": "neuralil-fast make-data " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "make-data"
        else " ".join(shlex.quote(a) for a in sys.argv),
        "started": start,
        "wall_time_s": round(wall, 1),
        "jobs": args.jobs,
        "omp_threads_per_process": cfg.threads,
        "method": "GFN2-xTB (tblite)",
        "seed": cfg.seed,
        "versions": xlabel.versions(),
        "xtb_settings": {**xlabel.XTB_SETTINGS, "accuracy": cfg.accuracy,
                         "electronic_temperature": cfg.electronic_temperature,
                         "initial_guess": "sad (fresh for every frame)",
                         "tblite_defaults": {"accuracy": 1.0, "electronic_temperature": 300.0}},
        "generator": cfg.as_dict(),
        "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3 (Voigt xx yy zz yz xz xy)"},
        **gen.summary(frames),
        "file_size_bytes": out.stat().st_size,
    }
    json_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(f"make-data: wrote {len(frames)} frames to {out} ({info['file_size_bytes'] / 1e6:.2f} MB) "
          f"and {json_path} in {wall:.0f} s; force std {info['force_std_eV_per_A']:.3f} eV/Å",
          file=sys.stderr)
    return 0
