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
    if not temps or not all(0 < t < float("inf") for t in temps):
        raise argparse.ArgumentTypeError("temperatures must be positive numbers in K")
    return temps


# The options that set a GeneratorConfig field: (option, type, field, help).  The
# default is the field's default; the parsed value is read back by config_from_args.
_CONFIG_OPTIONS = (
    ("--n-pairs", int, "n_pairs", "ion pairs per periodic box"),
    ("--n-configs", int, "n_configs", "labelled configurations in all"),
    ("--seed", int, "seed", "seed of the one numpy Generator behind everything"),
    ("--temperatures", _temperatures, "temperatures",
     "MD temperatures in K, one chain each, comma separated"),
    ("--timestep", float, "timestep_fs", "MD time step in fs"),
    ("--sample-every", int, "sample_every", "keep every n-th MD step"),
    ("--relax-steps", int, "relax_steps", "FIRE steps on each packed box"),
    ("--equil-steps", int, "equil_steps", "MD steps before the first kept frame"),
    ("--n-rattle", int, "n_rattle", "rattled copies per kept MD frame"),
    ("--rattle-std", float, "rattle_std", "rattle standard deviation in Å"),
    ("--n-strain", int, "n_strain", "strained copies per kept MD frame"),
    ("--max-strain", float, "max_strain", "largest strain component"),
    ("--accuracy", float, "accuracy", "tblite SCF accuracy"),
)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("ean_xtb.xyz"),
                        help="output extxyz file (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="provenance summary (default: the --out path with .json)")
    for option, type_, field, help_ in _CONFIG_OPTIONS:
        parser.add_argument(option, type=type_, default=getattr(_DEFAULTS, field),
                            help=f"{help_} (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one chain each (same results; "
                             "default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    return GeneratorConfig(**{field: getattr(args, _dest(option))
                              for option, _, field, _ in _CONFIG_OPTIONS})


def run(args: argparse.Namespace) -> int:
    from . import generate as gen
    from . import label as xlabel

    cfg = config_from_args(args)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
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
