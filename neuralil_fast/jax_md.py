"""JAX-MD adapter: a NeuralIL energy function and a neighbour function for ``jax_md.simulate``.

jax-md is an optional dependency (``pip install 'neuralil_fast[md]'``); it is
imported only when a function here needs it.

Positions and space
-------------------
Positions are real-space (Cartesian, Å) and *not wrapped*: an atom that leaves
the cell keeps moving, exactly as in ASE.  The cell is fixed.  We use
``jax_md.space.periodic_general(cell.T, fractional_coordinates=False,
wrapped=False)`` (see :func:`space`): its ``shift_fn`` is plain ``R + dR`` (so
trajectories are bit-comparable with ASE's VelocityVerlet), and its
``displacement_fn`` is the correct minimum-image displacement for whatever
analysis the user adds (``space.free()`` would give wrong displacements in a
periodic box).  The energy itself never uses ``displacement_fn``: periodic
images come from our own :class:`~neuralil_fast.neighbors.NeighborList`, whose
integer image shifts are valid for unwrapped positions and for cutoffs longer
than half the cell (no minimum-image limit).

Usage (float64: everything inside one ``jax.enable_x64`` scope)::

    from jax_md import simulate
    import neuralil_fast.jax_md as njm

    with jax.enable_x64(True):
        sys = njm.from_atoms(model, params, atoms, skin=0.5, backend="auto")
        init_fn, apply_fn = simulate.nve(sys.energy_fn, sys.shift_fn, dt)
        nbrs = sys.neighbor_fn.allocate(sys.R)
        state = init_fn(key, sys.R, kT=kT, mass=sys.mass, neighbor=nbrs)
        state, nbrs, info = njm.run(apply_fn, state, nbrs, sys.neighbor_fn, n_steps,
                                    chunk=100)

Units: Å, eV, amu; the time unit is then Å sqrt(amu/eV) = ``ase.units.fs`` / 0.09823
(so pass ``dt = 0.5 * ase.units.fs`` for 0.5 fs, and ``kT`` in eV).

The reallocate-on-overflow loop (:func:`run`)
---------------------------------------------
A neighbour list has a static capacity.  Inside ``jit`` the list is updated
with :meth:`NeighborFn.update` (rebuilt when an atom moved more than skin/2);
when the pairs no longer fit, the list sets its sticky ``did_overflow`` flag and
the pairs past the capacity are missing, so the forces of that chunk are wrong.
:func:`run` therefore advances ``chunk`` steps at a time inside one jitted
``lax.fori_loop``, reads the flag on the host after each chunk, and on overflow
throws the chunk away, reallocates a larger list on the host at the chunk's
*starting* positions and runs the chunk again.  A chunk is thus always computed
with a complete list.  Larger chunks mean fewer host round trips, smaller ones
less work lost per overflow.

Known jax-md behaviour (jax-md 0.2.29 with jax 0.10.2): ``velocity_verlet``
rounds ``dt`` to float32 (``f32(dt)``) even under x64, so a float64 run
integrates with ``float(np.float32(dt))``; to compare with another integrator
use that rounded step there too (:func:`jax_md_dt`).
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from .backends import resolve_backend
from .geometry import as_system, check_cell, species_indices, validate_skin
from .neighbors import NeighborList, allocate, update
from .potential import atomic_energies

__all__ = ["require_jax_md", "space", "energy_fn", "atomic_energy_fn", "neighbor_list",
           "NeighborFn", "from_atoms", "run", "jax_md_dt"]


def require_jax_md():
    """Import jax_md, or raise ImportError saying how to install it."""
    try:
        import jax_md
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "neuralil_fast.jax_md needs the optional package jax-md: "
            "pip install 'neuralil_fast[md]' (or: pip install jax-md)"
        ) from err
    return jax_md


def space(cell):
    """(displacement_fn, shift_fn) for real-space, non-wrapped positions in a fixed periodic cell.

    cell: (3, 3) Å, rows are lattice vectors (ASE's convention; jax-md's box is its transpose).
    """
    jax_md = require_jax_md()
    cell = jnp.asarray(np.asarray(cell, dtype=np.float64))
    return jax_md.space.periodic_general(cell.T, fractional_coordinates=False, wrapped=False)


def jax_md_dt(dt: float) -> float:
    """The time step jax-md's velocity Verlet actually uses (rounded to float32)."""
    return float(np.float32(dt))


def atomic_energy_fn(model, params, species, cell, backend: str = "auto"):
    """``fn(R, neighbor, **kwargs) -> (N,)`` atomic energies, eV.

    species: (N,) int indices into ``model.species``; cell: (3, 3) Å rows (fixed).
    ``neighbor`` is a :class:`NeighborList` from :func:`neighbor_list`.  Extra
    keyword arguments that jax-md passes along (``kT``, ...) are ignored.
    """
    backend = resolve_backend(backend)
    model.check_params(params)
    species_np = np.asarray(species)
    n_species = len(model.species)
    if species_np.ndim != 1 or not np.issubdtype(species_np.dtype, np.integer):
        raise ValueError(f"species must be a 1-D integer array of indices into "
                         f"model.species, got {species_np.dtype} of shape {species_np.shape}")
    bad = np.flatnonzero((species_np < 0) | (species_np >= n_species))
    if bad.size:  # a gather would clamp or wrap them silently
        raise ValueError(f"species indices {species_np[bad[:10]].tolist()} (atoms "
                         f"{bad[:10].tolist()}) are outside 0..{n_species - 1}, the indices "
                         f"of model.species {model.species}")
    species = jnp.asarray(species_np.astype(np.int32))
    cell_np = np.asarray(cell, dtype=np.float64)

    def fn(R, neighbor: NeighborList, **kwargs):
        if R.shape != (species.shape[0], 3):
            raise ValueError(f"R has shape {R.shape}; the species give {species.shape[0]} "
                             f"atoms, so (N, 3) = ({species.shape[0]}, 3)")
        c = jnp.asarray(cell_np, R.dtype)
        return atomic_energies(model, params, R, c, species, neighbor.centers,
                               neighbor.neighbors, neighbor.shifts, backend)

    return fn


def energy_fn(model, params, species, cell, backend: str = "auto"):
    """``fn(R, neighbor, **kwargs) -> ()`` total potential energy, eV, for ``jax_md.simulate``.

    R: (N, 3) real-space positions, Å, unwrapped; differentiable (forces = -grad).
    """
    atomic = atomic_energy_fn(model, params, species, cell, backend)

    def fn(R, neighbor: NeighborList, **kwargs):
        return jnp.sum(atomic(R, neighbor))

    return fn


@dataclasses.dataclass(frozen=True)
class NeighborFn:
    """jax-md style neighbour function over :class:`~neuralil_fast.neighbors.NeighborList`.

    ``allocate(R)`` (host) builds a list with room for ``capacity_multiplier`` times
    today's pairs within r_cut + skin; ``update(R, nbrs)`` is jittable and rebuilds
    only when an atom moved more than skin/2; ``nbrs.did_overflow`` is the sticky
    error flag (reallocate on the host: :meth:`reallocate` or :func:`run`).
    """

    cell: tuple
    pbc: tuple
    r_cut: float
    skin: float
    capacity_multiplier: float
    backend: str

    def allocate(self, R, extra_capacity: int = 0, capacity: int | None = None,
                 **kwargs) -> NeighborList:
        """Host: a fresh list for positions R (N, 3) Å; its dtype follows R."""
        R = np.asarray(R)
        if capacity is None and extra_capacity:
            probe = allocate(R, np.asarray(self.cell), np.asarray(self.pbc), self.r_cut,
                             self.skin, capacity_multiplier=self.capacity_multiplier,
                             backend=self.backend)
            capacity = probe.capacity + int(extra_capacity)
        return allocate(R, np.asarray(self.cell), np.asarray(self.pbc), self.r_cut, self.skin,
                        capacity_multiplier=self.capacity_multiplier, backend=self.backend,
                        capacity=capacity)

    def update(self, R, nbrs: NeighborList, **kwargs) -> NeighborList:
        """Jittable: the list for positions R; sets ``did_overflow`` when the capacity is short."""
        return update(nbrs, R, nbrs.reference_cell)

    def reallocate(self, R, nbrs: NeighborList) -> NeighborList:
        """Host: a list for R with at least ``capacity_multiplier`` times the old capacity.

        Growing geometrically guarantees that the overflow loop of :func:`run` ends.
        """
        fresh = self.allocate(R)
        grown = int(math.ceil(nbrs.capacity * max(self.capacity_multiplier, 1.25)))
        if fresh.capacity >= grown:
            return fresh
        return self.allocate(R, capacity=grown)


def neighbor_list(model_or_r_cut, cell, pbc=True, skin: float = 0.5,
                  capacity_multiplier: float = 1.25, backend: str = "auto") -> NeighborFn:
    """A :class:`NeighborFn` for a model (its r_cut) or a cutoff in Å, in a fixed cell.

    backend: the neighbour-list build inside ``jit``: "numba" (the O(N) cell list through
    the XLA FFI), "triton" (the same through jax-triton), "reference" (the dense
    O(N^2 x images) pure-JAX build, for small systems and checks), "auto".
    """
    r_cut = float(getattr(model_or_r_cut, "r_cut", model_or_r_cut))
    cell, pbc = check_cell(cell, pbc)
    return NeighborFn(tuple(map(tuple, cell.tolist())), tuple(bool(p) for p in pbc), r_cut,
                      validate_skin(skin), float(capacity_multiplier), resolve_backend(backend))


def from_atoms(model, params, atoms, skin: float = 0.5, backend: str = "auto",
               neighbor_backend: str = "auto", capacity_multiplier: float = 1.25):
    """Everything a jax-md simulation of ``atoms`` needs, as a namespace.

    Fields: energy_fn, atomic_energy_fn, neighbor_fn, displacement_fn, shift_fn,
    R (N, 3) positions in the current JAX default float dtype, mass (N,) amu,
    species (N,) int32, cell (3, 3).
    """
    system = as_system(atoms)
    if not system.pbc.all():
        raise ValueError("the jax-md adapter needs a fully periodic cell (pbc = True, True, True)")
    species = species_indices(system.numbers, model.species)
    displacement_fn, shift_fn = space(system.cell)
    dtype = jnp.zeros(()).dtype  # float64 inside jax.enable_x64(True), else float32
    return SimpleNamespace(
        energy_fn=energy_fn(model, params, species, system.cell, backend),
        atomic_energy_fn=atomic_energy_fn(model, params, species, system.cell, backend),
        neighbor_fn=neighbor_list(model, system.cell, system.pbc, skin, capacity_multiplier,
                                  neighbor_backend),
        displacement_fn=displacement_fn,
        shift_fn=shift_fn,
        R=jnp.asarray(system.positions, dtype),
        mass=jnp.asarray(atoms.get_masses(), dtype),
        species=jnp.asarray(species),
        cell=jnp.asarray(system.cell, dtype),
    )


def _chunk_runner(apply_fn, neighbor_fn: NeighborFn, n: int):
    def body(_, carry):
        state, nbrs = carry
        state = apply_fn(state, neighbor=nbrs)
        nbrs = neighbor_fn.update(state.position, nbrs)
        return state, nbrs

    @jax.jit
    def advance(state, nbrs):
        return jax.lax.fori_loop(0, n, body, (state, nbrs))

    return advance


def run(apply_fn, state, nbrs: NeighborList, neighbor_fn: NeighborFn, n_steps: int,
        chunk: int = 100, callback=None, max_reallocations: int = 20):
    """Advance ``n_steps`` steps of ``apply_fn(state, neighbor=nbrs)``; reallocate on overflow.

    Runs ``chunk`` steps per jitted ``lax.fori_loop``; after each chunk the host reads
    ``nbrs.did_overflow``: if set, the chunk is discarded, the list is reallocated
    (larger) at the chunk's starting positions, and the chunk is run again.
    ``callback(step, state, nbrs)`` (host) is called after each accepted chunk.

    Returns (state, nbrs, info) with info = dict(steps, chunks, reallocations).
    """
    if n_steps < 0 or chunk < 1:
        raise ValueError(f"need n_steps >= 0 and chunk >= 1, got {n_steps}, {chunk}")
    if bool(nbrs.did_overflow):
        nbrs = neighbor_fn.reallocate(state.position, nbrs)
    runners = {}
    done = chunks = reallocations = 0
    while done < n_steps:
        n = min(chunk, n_steps - done)
        key = (n, nbrs.capacity)
        if key not in runners:
            runners[key] = _chunk_runner(apply_fn, neighbor_fn, n)
        new_state, new_nbrs = runners[key](state, nbrs)
        if bool(new_nbrs.did_overflow):
            reallocations += 1
            if reallocations > max_reallocations:
                raise RuntimeError(f"neighbour list still overflows after {max_reallocations} "
                                   "reallocations (is the system exploding?)")
            nbrs = neighbor_fn.reallocate(state.position, nbrs)
            continue
        state, nbrs = new_state, new_nbrs
        done += n
        chunks += 1
        if callback is not None:
            callback(done, state, nbrs)
    return state, nbrs, dict(steps=done, chunks=chunks, reallocations=reallocations)
