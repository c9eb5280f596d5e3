"""Element-resolved spherical Bessel power spectrum (neuralil-model.md §2).

The functional core works on a pair list (the layout of ``neighbors``):

    displacements (P, 3) Å     x_j + S @ cell - x_i, one row per pair
    centers       (P,) int32   i, centre-sorted; padding rows carry n_atoms
    neighbor_species (P,) int32  species index of j

and returns (n_atoms, n_features) descriptors.  Two reference forms live here
(the literal Legendre double sum and the O(neighbours) spherical-harmonic form);
the kernels in ``neuralil_fast.kernels`` must equal them.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .backends import resolve_backend
from .basis import legendre, radial_basis, real_spherical_harmonics
from .geometry import as_system, species_indices, validate_cutoff

__all__ = ["DescriptorSpec", "SphericalBessel", "descriptors", "descriptors_reference",
           "descriptors_legendre"]


@dataclasses.dataclass(frozen=True)
class DescriptorSpec:
    """Static configuration of the descriptors (hashable: usable as a jit static argument)."""

    n_species: int
    r_cut: float
    n_max: int

    def __post_init__(self):
        validate_cutoff(self.r_cut)
        if int(self.n_max) != self.n_max or self.n_max < 0:
            raise ValueError(f"n_max must be an integer >= 0, got {self.n_max}")
        if self.n_species < 1:
            raise ValueError(f"need at least one species, got {self.n_species}")

    @property
    def basis(self):
        return radial_basis(self.n_max, self.r_cut)

    @property
    def n_nl(self) -> int:
        return (self.n_max + 1) * (self.n_max + 2) // 2

    @property
    def n_species_pairs(self) -> int:
        return self.n_species * (self.n_species + 1) // 2

    @property
    def n_features(self) -> int:
        return self.n_species_pairs * self.n_nl

    def species_pairs(self) -> list[tuple[int, int]]:
        """(a, b), a <= b, row-major upper triangle: (0,0), (0,1), ..., (S-1,S-1)."""
        return [(a, b) for a in range(self.n_species) for b in range(a, self.n_species)]

    def nlm_tables(self):
        """For the flattened (n, l, m) axis: its (n, l) column and its lm column, numpy int."""
        nl_of, lm_of = [], []
        for c, (n, l) in enumerate(self.basis.nl):
            for m in range(-l, l + 1):
                nl_of.append(c)
                lm_of.append(l * l + l + m)
        return np.array(nl_of), np.array(lm_of)


def _pair_geometry(displacements, centers, n_atoms: int, r_cut: float):
    """(r (P,), unit vectors (P, 3), valid (P,) bool), NaN-safe at r = 0 and for padding."""
    r2 = jnp.sum(displacements * displacements, axis=-1)
    valid = (centers < n_atoms) & (r2 > 0.0) & (r2 < r_cut * r_cut)
    # Mask before the sqrt and the division so that gradients at r = 0 stay finite.
    r2_safe = jnp.where(valid, r2, 1.0)
    r = jnp.sqrt(r2_safe)
    unit = jnp.where(valid[:, None], displacements / r[:, None], 0.0)
    return jnp.where(valid, r, r_cut), unit, valid


def density_coefficients(spec: DescriptorSpec, displacements, centers, neighbor_species,
                         n_atoms: int):
    """A^a_{nlm}(i): (n_atoms, n_species, n_nlm)."""
    r, unit, valid = _pair_geometry(displacements, centers, n_atoms, spec.r_cut)
    g = spec.basis(r) * valid[:, None]
    Y = real_spherical_harmonics(spec.n_max, unit)
    nl_of, lm_of = spec.nlm_tables()
    contrib = g[:, nl_of] * Y[:, lm_of]
    segment = jnp.where(valid, centers * spec.n_species + neighbor_species, n_atoms * spec.n_species)
    A = jax.ops.segment_sum(contrib, segment, num_segments=n_atoms * spec.n_species)
    return A.reshape(n_atoms, spec.n_species, contrib.shape[-1])


def power_spectrum(spec: DescriptorSpec, A):
    """p^{ab}_{nl} = sum_m A^a_{nlm} A^b_{nlm}: (n_atoms, n_features), pair-major, nl-minor."""
    a_idx, b_idx = np.array(spec.species_pairs()).T
    nl_of, _ = spec.nlm_tables()
    prod = A[:, a_idx, :] * A[:, b_idx, :]  # (N, pairs, n_nlm)
    summ = np.zeros((len(nl_of), spec.n_nl))
    summ[np.arange(len(nl_of)), nl_of] = 1.0
    p = prod @ jnp.asarray(summ, A.dtype)
    return p.reshape(A.shape[0], spec.n_features)


def descriptors_reference(spec: DescriptorSpec, displacements, centers, neighbor_species,
                          n_atoms: int):
    """The spherical-harmonic form in pure JAX: (n_atoms, n_features)."""
    A = density_coefficients(spec, displacements, centers, neighbor_species, n_atoms)
    return power_spectrum(spec, A)


def descriptors_legendre(spec: DescriptorSpec, displacements, centers, neighbor_species,
                         n_atoms: int, max_neighbors: int):
    """The literal double sum with Legendre polynomials (O(neighbours^2) per centre).

    ``max_neighbors`` (static) bounds the pairs per centre; centres must be sorted.
    """
    P = displacements.shape[0]
    r, unit, valid = _pair_geometry(displacements, centers, n_atoms, spec.r_cut)
    g = spec.basis(r) * valid[:, None]
    first = jnp.searchsorted(centers, jnp.arange(n_atoms + 1), side="left")
    row = jnp.minimum(centers, n_atoms)
    slot = jnp.arange(P) - first[row]
    keep = valid & (slot < max_neighbors)
    row = jnp.where(keep, row, n_atoms)
    slot = jnp.where(keep, slot, 0)
    shape = (n_atoms + 1, max_neighbors)
    G = jnp.zeros(shape + (spec.n_nl,), g.dtype).at[row, slot].set(g)[:n_atoms]
    U = jnp.zeros(shape + (3,), g.dtype).at[row, slot].set(unit)[:n_atoms]
    W = jnp.zeros(shape + (spec.n_species,), g.dtype).at[row, slot].set(
        jax.nn.one_hot(neighbor_species, spec.n_species, dtype=g.dtype))[:n_atoms]
    cos = jnp.einsum("ijx,ikx->ijk", U, U)
    Pl = legendre(spec.n_max, cos)
    ls = [l for (_, l) in spec.basis.nl]
    ang = jnp.stack([(2 * l + 1) / (4 * math.pi) * Pl[l] for l in ls], axis=-1)  # (N, M, M, n_nl)
    full = jnp.einsum("ija,ikb,ijn,ikn,ijkn->iabn", W, W, G, G, ang)
    a_idx, b_idx = np.array(spec.species_pairs()).T
    return full[:, a_idx, b_idx, :].reshape(n_atoms, spec.n_features)


def descriptors(spec: DescriptorSpec, displacements, centers, neighbor_species, n_atoms: int,
                backend: str = "auto"):
    """Descriptors (n_atoms, n_features) from pairs, through the chosen backend.

    Differentiable in ``displacements`` on every backend (kernels via custom_vjp).
    """
    backend = resolve_backend(backend)
    # the scope names these ops (and their derivatives) in profiles of either backend
    with jax.named_scope("descriptors"):
        if backend == "reference":
            return descriptors_reference(spec, displacements, centers, neighbor_species,
                                         n_atoms)
        from .kernels_api import kernel_descriptors

        return kernel_descriptors(spec, displacements, centers, neighbor_species, n_atoms,
                                  backend)


@dataclasses.dataclass(frozen=True)
class SphericalBessel:
    """The descriptor engine, standalone.

    >>> sb = SphericalBessel(species=("C", "H", "N", "O"), r_cut=3.5, n_max=4)
    >>> sb.n_features
    150
    """

    species: tuple
    r_cut: float = 3.5
    n_max: int = 4

    def __post_init__(self):
        object.__setattr__(self, "species", tuple(self.species))
        if len(set(self.species)) != len(self.species):
            raise ValueError(f"species must be distinct, got {self.species}")
        from ase.data import atomic_numbers

        unknown = [s for s in self.species if s not in atomic_numbers]
        if unknown:
            raise ValueError(f"unknown element symbols {unknown}")
        validate_cutoff(self.r_cut)
        if int(self.n_max) != self.n_max or self.n_max < 0:
            raise ValueError(f"n_max must be an integer >= 0, got {self.n_max}")

    @property
    def spec(self) -> DescriptorSpec:
        return DescriptorSpec(len(self.species), float(self.r_cut), int(self.n_max))

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    def compute(self, atoms, backend: str = "auto") -> np.ndarray:
        """(n_atoms, n_features) float64 numpy descriptors of ASE ``atoms``."""
        from .neighbors import neighbor_pairs, pair_displacements

        system = as_system(atoms)
        sp = species_indices(system.numbers, self.species)
        i, j, S = neighbor_pairs(atoms, self.r_cut, backend=backend)
        with jax.enable_x64(True):
            d = pair_displacements(jnp.asarray(system.positions, jnp.float64),
                                   jnp.asarray(system.cell, jnp.float64),
                                   jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32),
                                   jnp.asarray(S, jnp.int32))
            X = descriptors(self.spec, d, jnp.asarray(i, jnp.int32), jnp.asarray(sp[j], jnp.int32),
                            system.n_atoms, backend=backend)
            return np.asarray(X, dtype=np.float64)
