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
from .model import NeuralIL, pair_atomic_energies
from .neighbors import pair_displacements, times_3x3

__all__ = ["atomic_energies", "evaluate", "evaluate_jit", "block_pairs_needed"]


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
    return _energies_from_pairs(model, params, d, centers, species, species_j, backend)


def _energies_from_pairs(model: NeuralIL, params, d, centers, species, species_j, backend):
    """(n,) atomic energies of the n = len(species) centres from their pairs, eV.

    d (P, 3) Å and species_j (P,) per pair; centers (P,) in 0..n, centre-sorted, n = padding.
    """
    n_atoms = species.shape[0]
    desc_species = species_j if model.element_resolved else jnp.zeros_like(species_j)
    X = descriptors(model.spec, d, centers, desc_species, n_atoms, backend=backend)
    e, morse = model.apply_network(params, X, species)
    if morse is not None or model.core_repulsion is not None:
        r, _, valid = _pair_geometry(d, centers, n_atoms, model.r_cut)
        species_i = species[jnp.where(centers < n_atoms, centers, 0)]
        e = e + pair_atomic_energies(model, morse, r, valid, species_i, species_j, centers,
                                     n_atoms)
    return e


def _deformation(strain):
    return jnp.eye(3, dtype=strain.dtype) + 0.5 * (strain + strain.T)


def _voigt_stress(g_strain, cell):
    s = g_strain / jnp.abs(jnp.linalg.det(cell))
    return jnp.stack([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def evaluate(model: NeuralIL, params, positions, cell, species, centers, neighbors, shifts,
             backend: str = "reference", stress: bool = True, block_atoms: int | None = None,
             block_pairs: int | None = None):
    """dict(energy (), energies (N,), forces (N, 3), [stress (6,)]) in eV, eV/Å, eV/Å^3.

    With ``block_atoms`` (static) smaller than N, the centres are taken ``block_atoms`` at
    a time in a ``lax.scan`` (see :func:`_evaluate_blocked`), so that the temporaries of
    the evaluation scale with the block, not with N; ``block_pairs`` (static) is the
    window of pair slots a block reads, and the result then also holds
    ``max_block_pairs`` (): when it exceeds ``block_pairs`` the result is incomplete and
    the caller must re-evaluate with a larger window (see :func:`block_pairs_needed`).
    """
    if positions.shape[0] == 0:  # no atoms: nothing to gather from, every sum is empty
        out = {"energy": jnp.zeros((), positions.dtype), "energies": jnp.zeros(0, positions.dtype),
               "forces": jnp.zeros((0, 3), positions.dtype)}
        if stress:
            out["stress"] = jnp.zeros(6, positions.dtype)
        return out
    if block_atoms is not None and block_atoms < positions.shape[0]:
        return _evaluate_blocked(model, params, positions, cell, species, centers, neighbors,
                                 shifts, backend, stress, int(block_atoms), block_pairs)

    def total(pos, strain):
        deform = _deformation(strain)
        e = atomic_energies(model, params, times_3x3(pos, deform), times_3x3(cell, deform),
                            species, centers, neighbors, shifts, backend)
        return jnp.sum(e), e

    strain = jnp.zeros((3, 3), positions.dtype)
    (energy, energies), (g_pos, g_strain) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(positions, strain)
    out = {"energy": energy, "energies": energies, "forces": -g_pos}
    if stress:
        out["stress"] = _voigt_stress(g_strain, cell)
    return out


def _block_bounds(centers, n_atoms: int, block_atoms: int):
    """(n_blocks + 1,) first pair slot of each block of centres (pairs are centre-sorted)."""
    n_blocks = -(-n_atoms // block_atoms)
    starts = jnp.arange(n_blocks + 1, dtype=jnp.int32) * block_atoms
    return jnp.searchsorted(centers, jnp.minimum(starts, n_atoms), side="left").astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n_atoms", "block_atoms"))
def block_pairs_needed(centers, n_atoms: int, block_atoms: int):
    """() int32: the most pair slots any block of ``block_atoms`` centres holds."""
    b = _block_bounds(centers, n_atoms, block_atoms)
    return jnp.max(b[1:] - b[:-1])


def _evaluate_blocked(model, params, positions, cell, species, centers, neighbors, shifts,
                      backend, stress, block_atoms, block_pairs):
    """``evaluate`` over blocks of ``block_atoms`` centres, one ``lax.scan`` step each.

    Block k owns centres [k C, (k+1) C).  Its pairs are a contiguous run of the
    centre-sorted list, read through a static window of ``block_pairs`` slots; slots of
    the window outside the block are masked (zero displacement, which the descriptors and
    the Morse term ignore, or the padding centre).  Forces and the strain derivative of
    every block are summed; the result equals the unblocked evaluation up to rounding.
    """
    n_atoms = positions.shape[0]
    n_slots = centers.shape[0]
    window = n_slots if block_pairs is None else min(int(block_pairs), n_slots)
    C = block_atoms
    n_blocks = -(-n_atoms // C)
    dtype = positions.dtype
    bounds = _block_bounds(centers, n_atoms, C)
    species_pad = jnp.pad(species, (0, n_blocks * C - n_atoms))

    def block(carry, k):
        g_pos, g_strain, energies, energy = carry
        c0 = k * C
        start = jnp.minimum(bounds[k], n_slots - window)
        cb, jb, sb = (jax.lax.dynamic_slice_in_dim(a, start, window)
                      for a in (centers, neighbors, shifts))
        inside = (cb >= c0) & (cb < c0 + C) & (cb < n_atoms)
        # Monotone in cb, so the local centres stay sorted: earlier centres -> 0 (with d = 0),
        # later centres and padding -> C (the padding centre of the block).
        local = jnp.where(inside, cb - c0, jnp.where(cb < c0, 0, C)).astype(jnp.int32)
        i_safe = jnp.where(inside, cb, 0)
        j_safe = jnp.where(inside, jb, 0)
        species_c = jax.lax.dynamic_slice_in_dim(species_pad, c0, C)
        species_j = jnp.where(inside, species[j_safe], 0)
        owned = c0 + jnp.arange(C) < n_atoms
        shift_vec = times_3x3(sb.astype(dtype), cell)

        def block_energy(pos, strain):
            d = times_3x3(pos[j_safe] - pos[i_safe] + shift_vec, _deformation(strain))
            d = jnp.where(inside[:, None], d, 0.0)
            e = _energies_from_pairs(model, params, d, local, species_c, species_j, backend)
            e = jnp.where(owned, e, 0.0)
            return jnp.sum(e), e

        (e_sum, e), (gp, gs) = jax.value_and_grad(block_energy, argnums=(0, 1), has_aux=True)(
            positions, jnp.zeros((3, 3), dtype))
        energies = jax.lax.dynamic_update_slice_in_dim(energies, e, c0, 0)
        return (g_pos + gp, g_strain + gs, energies, energy + e_sum), None

    init = (jnp.zeros_like(positions), jnp.zeros((3, 3), dtype),
            jnp.zeros((n_blocks * C,), dtype), jnp.zeros((), dtype))
    (g_pos, g_strain, energies, energy), _ = jax.lax.scan(
        block, init, jnp.arange(n_blocks, dtype=jnp.int32))
    out = {"energy": energy, "energies": energies[:n_atoms], "forces": -g_pos,
           "max_block_pairs": jnp.max(bounds[1:] - bounds[:-1])}
    if stress:
        out["stress"] = _voigt_stress(g_strain, cell)
    return out


@functools.partial(jax.jit, static_argnames=("model", "backend", "stress", "block_atoms",
                                             "block_pairs"))
def evaluate_jit(model, params, positions, cell, species, centers, neighbors, shifts,
                 backend="reference", stress=True, block_atoms=None, block_pairs=None):
    return evaluate(model, params, positions, cell, species, centers, neighbors, shifts,
                    backend=backend, stress=stress, block_atoms=block_atoms,
                    block_pairs=block_pairs)
