"""Cells, periodicity and validation: the first stage of the data flow.

Conventions (ASE's): a cell is a (3, 3) array whose *rows* are the lattice
vectors, in Å; fractional coordinates s satisfy x = s @ cell; ``pbc`` is a
(3,) bool array, one flag per lattice direction.  Open directions may have a
zero lattice vector.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "System",
    "as_system",
    "perpendicular_widths",
    "wrap_positions",
    "validate_cutoff",
    "validate_skin",
    "check_positions",
    "check_cell",
    "species_indices",
]


@dataclass(frozen=True)
class System:
    """Host-side description of one configuration.

    positions: (N, 3) float Å, unwrapped, as given.
    cell: (3, 3) float Å, rows are lattice vectors.
    pbc: (3,) bool.
    numbers: (N,) int atomic numbers.
    """

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])


def check_positions(positions) -> np.ndarray:
    """Return positions as a (N, 3) float array; ValueError on NaN/inf or a bad shape."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {positions.shape}")
    if not np.issubdtype(positions.dtype, np.floating):
        positions = positions.astype(np.float64)
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        raise ValueError(
            f"positions contain NaN or inf (atoms {np.flatnonzero(bad)[:10].tolist()})"
        )
    return positions


def check_cell(cell, pbc) -> tuple[np.ndarray, np.ndarray]:
    """Return (cell (3, 3), pbc (3,) bool); ValueError if a periodic direction is degenerate.

    A periodic lattice vector must be non-zero and the periodic vectors must be
    linearly independent of each other and of the others (the cell volume
    spanned must not vanish).
    """
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (3,):
        cell = np.diag(cell)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3) or (3,), got {cell.shape}")
    if not np.isfinite(cell).all():
        raise ValueError("cell contains NaN or inf")
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if pbc.any():
        # Perpendicular widths vanish exactly when the periodic part of the cell is singular.
        full = _complete_cell(cell, pbc)
        vol = abs(np.linalg.det(full))
        scale = np.prod(np.maximum(np.linalg.norm(full, axis=1), 1e-300))
        if vol <= 1e-10 * scale:
            raise ValueError(
                "degenerate (singular) cell: the periodic lattice vectors "
                f"{np.flatnonzero(pbc).tolist()} do not span a volume (det = {vol:.3g})"
            )
    return cell, pbc


def _array_module(x):
    """``jax.numpy`` for a JAX array (tracers included), ``numpy`` for anything else.

    Lets the cell helpers below serve both the host (NumPy) and jitted (JAX) code
    paths with one implementation; JAX is not imported here unless already loaded.
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        import jax.numpy as jnp

        return jnp
    return np


def _complete_cell(cell, pbc):
    """The cell with each open direction's vector replaced by a unit vector orthogonal
    to the periodic ones, so that fractional coordinates are always defined.

    Open directions carry no images, so their lattice vectors (often zero) only
    need to complete a basis.  ``cell`` may be a NumPy or a JAX array (traceable
    under ``jit``); ``pbc`` must be concrete (array or tuple of bools).
    """
    xp = _array_module(cell)
    pbc = np.asarray(pbc, dtype=bool)
    periodic = [cell[k] for k in np.flatnonzero(pbc)]
    if len(periodic) == 3:
        return cell.copy()
    if len(periodic) == 2:
        complement = [xp.cross(periodic[0], periodic[1])]
    elif len(periodic) == 1:
        a = periodic[0]
        b = xp.cross(a, xp.eye(3, dtype=cell.dtype)[xp.argmin(xp.abs(a))])
        complement = [b, xp.cross(a, b)]
    else:
        complement = list(xp.eye(3, dtype=cell.dtype))
    it = iter(complement)
    rows = []
    for k in range(3):
        if pbc[k]:
            rows.append(cell[k])
        else:
            v = next(it)
            norm = xp.linalg.norm(v)
            rows.append(v / xp.where(norm > 0, norm, 1.0))  # a zero v stays zero
    return xp.stack(rows)


def perpendicular_widths(cell):
    """(3,) distances between opposite faces of the cell, Å: V / |a_j x a_k|.

    NumPy input (anything array-like) is computed in float64 and gives a NumPy
    array; a JAX array keeps its dtype and gives a JAX array (traceable).  A
    degenerate cell gives width 0 where a face area vanishes.
    """
    xp = _array_module(cell)
    if xp is np:
        cell = np.asarray(cell, dtype=np.float64)
    vol = xp.abs(xp.linalg.det(cell))
    cross = xp.stack(
        [xp.cross(cell[1], cell[2]), xp.cross(cell[2], cell[0]), xp.cross(cell[0], cell[1])]
    )
    return vol / xp.maximum(xp.linalg.norm(cross, axis=1), 1e-30)


def wrap_positions(positions, cell, pbc, beyond: int | None = None) -> np.ndarray:
    """Positions moved into the cell along periodic directions (fractional in [0, 1)).

    With ``beyond`` = k only the atoms more than k cells away along some periodic
    direction (|floor(fractional)| > k) are wrapped; the others are returned unchanged.
    """
    positions = check_positions(positions)
    cell, pbc = check_cell(cell, pbc)
    if not pbc.any():
        return positions.copy()
    full = _complete_cell(cell, pbc)
    if beyond is not None and len(positions):
        # |fractional_k| = |x . b_k| <= |x| |b_k| (b_k: column k of the inverse cell): when
        # that bound is within `beyond` for every atom, none is beyond; skip the solve
        reach = np.sqrt(np.max(np.einsum("ij,ij->i", positions, positions)))
        if reach * np.max(np.linalg.norm(np.linalg.inv(full)[:, pbc], axis=0)) <= beyond:
            return positions.copy()
    frac = np.linalg.solve(full.T, positions.T).T
    whole = np.floor(frac[:, pbc])
    frac[:, pbc] -= whole
    # floor can leave exactly 1.0 after rounding; keep the half-open interval.
    frac[:, pbc] = np.where(frac[:, pbc] >= 1.0, 0.0, frac[:, pbc])
    wrapped = frac @ full
    if beyond is None:
        return wrapped
    far = (np.abs(whole) > beyond).any(axis=1)
    return np.where(far[:, None], wrapped, positions)


def validate_cutoff(r_cut) -> float:
    r_cut = float(r_cut)
    if not np.isfinite(r_cut) or r_cut <= 0.0:
        raise ValueError(f"r_cut must be a positive finite number of Å, got {r_cut}")
    return r_cut


def validate_skin(skin) -> float:
    """The neighbour-list skin as a float, Å; ValueError unless finite and >= 0."""
    skin = float(skin)
    if not (np.isfinite(skin) and skin >= 0.0):
        raise ValueError(f"skin must be >= 0 Å, got {skin}")
    return skin


def as_system(atoms=None, *, positions=None, cell=None, pbc=None, numbers=None) -> System:
    """A validated :class:`System` from ASE Atoms or from arrays."""
    if atoms is not None:
        positions = atoms.get_positions()
        cell = np.asarray(atoms.get_cell())
        pbc = atoms.get_pbc()
        numbers = atoms.get_atomic_numbers()
    positions = check_positions(positions)
    if cell is None:
        cell = np.zeros((3, 3))
    if pbc is None:
        pbc = np.zeros(3, bool)
    cell, pbc = check_cell(cell, pbc)
    if numbers is None:
        numbers = np.zeros(len(positions), int)
    numbers = np.asarray(numbers)
    if numbers.shape != (positions.shape[0],):
        raise ValueError(
            f"got {numbers.shape[0]} atomic numbers for {positions.shape[0]} positions"
        )
    return System(positions, cell, pbc, numbers)


def species_indices(numbers, species: tuple[str, ...]) -> np.ndarray:
    """(N,) int32 index of each atom's element in ``species``; ValueError naming unknown ones."""
    from ase.data import atomic_numbers, chemical_symbols

    table = {atomic_numbers[s]: k for k, s in enumerate(species)}
    numbers = np.asarray(numbers)
    out = np.empty(numbers.shape, np.int32)
    unknown = set()
    for a, z in enumerate(numbers.tolist()):
        k = table.get(z)
        if k is None:
            unknown.add(chemical_symbols[z])
        else:
            out[a] = k
    if unknown:
        raise ValueError(
            f"unknown species {sorted(unknown)}: this model/descriptor was built for {list(species)}"
        )
    return out
