"""Energy, forces, stress and atomic energies from (model, params, system, pairs).

One pure core, ``evaluate``: a single reverse pass gives forces (-dE/dx) and
the stress ((1/V) dE/dε at ε = 0, ASE's sign and Voigt order xx yy zz yz xz xy).
Everything is jittable with ``model`` and ``backend`` static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .descriptors import _pair_geometry, descriptors
from .model import NeuralIL, morse_atomic_energies
from .neighbors import pair_displacements

__all__ = ["atomic_energies", "evaluate", "evaluate_jit"]


def atomic_energies(model: NeuralIL, params, positions, cell, species, centers, neighbors,
                    shifts, backend: str = "reference"):
    """(N,) atomic energies, eV.

    positions (N, 3) Å; cell (3, 3) Å rows; species (N,) int32 indices into model.species;
    centers/neighbors (P,) int32 and shifts (P, 3) int32 in the pair layout of ``neighbors``.
    """
    n_atoms = positions.shape[0]
    d = pair_displacements(positions, cell, centers, neighbors, shifts)
    valid_row = centers < n_atoms
    species_j = jnp.where(valid_row, species[jnp.where(valid_row, neighbors, 0)], 0)
    desc_species = species_j if model.element_resolved else jnp.zeros_like(species_j)
    X = descriptors(model.spec, d, centers, desc_species, n_atoms, backend=backend)
    e, morse = model.apply_network(params, X, species)
    if morse is not None:
        abd, switch = morse
        r, _, valid = _pair_geometry(d, centers, n_atoms, model.r_cut)
        species_i = species[jnp.where(valid_row, centers, 0)]
        e = e + morse_atomic_energies(abd, switch, r, valid, species_i, species_j, centers,
                                      n_atoms, model.r_cut)
    return e


def evaluate(model: NeuralIL, params, positions, cell, species, centers, neighbors, shifts,
             backend: str = "reference", stress: bool = True):
    """dict(energy (), energies (N,), forces (N, 3), [stress (6,)]) in eV, eV/Å, eV/Å^3."""

    def total(pos, strain):
        deform = jnp.eye(3, dtype=pos.dtype) + 0.5 * (strain + strain.T)
        e = atomic_energies(model, params, pos @ deform, cell @ deform, species, centers,
                            neighbors, shifts, backend)
        return jnp.sum(e), e

    strain = jnp.zeros((3, 3), positions.dtype)
    (energy, energies), (g_pos, g_strain) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(positions, strain)
    out = {"energy": energy, "energies": energies, "forces": -g_pos}
    if stress:
        s = g_strain / jnp.abs(jnp.linalg.det(cell))
        out["stress"] = jnp.stack([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    return out


@functools.partial(jax.jit, static_argnames=("model", "backend", "stress"))
def evaluate_jit(model, params, positions, cell, species, centers, neighbors, shifts,
                 backend="reference", stress=True):
    return evaluate(model, params, positions, cell, species, centers, neighbors, shifts,
                    backend=backend, stress=stress)
