"""neuralil_fast: the NeuralIL force field with hand-written kernels, exactly differentiable.

Public names (see README): SphericalBessel, neighbor_pairs, NeighborList,
NeuralIL, save, load, from_neuralil, Calculator.  Submodules load on first use,
so ``import neuralil_fast`` stays cheap and changes no global JAX setting.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "SphericalBessel": "descriptors",
    "neighbor_pairs": "neighbors",
    "NeighborList": "neighbors",
    "NeuralIL": "model",
    "save": "model",
    "load": "model",
    "from_neuralil": "model",
    "Calculator": "calculator",
    "read_dataset": "io",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'neuralil_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
