"""Bridge between the JAX-facing modules and the hand-written kernels.

Everything here takes and returns arrays in the project's pair layout (see
``neighbors``); the kernels themselves live in ``neuralil_fast.kernels``.
"""
from __future__ import annotations

import functools


@functools.cache
def numba_available() -> bool:
    """True when the numba kernels are importable (the FFI itself may still fall back)."""
    # Until the descriptor kernels are wired into JAX, "auto" means the reference path.
    return False


def host_pairs(positions, cell, pbc, r_cut, backend):
    """(i, j, S) numpy pairs from the kernel of ``backend``, centre-sorted."""
    if backend == "numba":
        from .kernels.cpu.neighbors import neighbor_pairs_numba

        return neighbor_pairs_numba(positions, cell, pbc, r_cut)
    raise NotImplementedError(f"no host neighbour kernel for backend {backend!r}")


def jax_build_pairs(positions, cell, nl):
    raise NotImplementedError(f"no jittable neighbour kernel for backend {nl.backend!r}")


def kernel_descriptors(spec, displacements, centers, neighbor_species, n_atoms, backend):
    raise NotImplementedError(f"no descriptor kernel for backend {backend!r}")
