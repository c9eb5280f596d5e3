"""The ``neuralil-fast`` command line.

Each sub-command lives in the module that owns its work and registers here
through ``COMMANDS``: name -> (module, help).  A module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("neuralil_fast.demo", "train on bundled data, run a short MD, print accuracy and speed"),
    "train": ("neuralil_fast.training.cli", "train a NeuralIL model on energies and forces"),
    "evaluate": ("neuralil_fast.evaluate", "energy and force errors of a model on a data set"),
    "md": ("neuralil_fast.md", "molecular dynamics with ASE"),
    "bench": ("neuralil_fast.bench", "the speed table of this machine"),
    "make-data": ("neuralil_fast.datagen.cli", "make GFN2-xTB reference data for EAN"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuralil-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"neuralil-fast: the '{args.command}' command is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"neuralil-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


def _compilation_cache() -> None:
    """Keep XLA's compiled programs between runs of the command (jax's persistent cache)
    in the folder of the compiled kernels (``NEURALIL_FAST_CACHE``; ``0``: none), unless
    the user has chosen one (``JAX_COMPILATION_CACHE_DIR``).  Only for the command: a
    program importing neuralil_fast keeps its own jax configuration."""
    import os

    from .kernels.ffi import cache_dir

    root = cache_dir()
    if root is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))


def entry() -> int:
    """The ``neuralil-fast`` program (``python -m neuralil_fast``)."""
    _compilation_cache()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
