"""ASE calculator: energy, free_energy, energies, forces, stress in one pass.

The neighbour list is kept between calls with a Verlet skin and reallocated
on overflow; JAX's global configuration is never changed (float64 work runs
inside a scoped ``jax.enable_x64``).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from .backends import resolve_backend
from .geometry import as_system, species_indices, validate_skin, wrap_positions
from .neighbors import allocate, reallocate, update
from .potential import block_pairs_needed, evaluate_jit

_update_jit = jax.jit(update)

__all__ = ["Calculator"]


def _window(need: int) -> int:
    """Pair slots per block for ``need``: room for the list's fluctuations between rebuilds,
    in steps of 4096 slots so that a slightly larger window does not recompile."""
    return int(math.ceil(need * 1.1 / 4096.0)) * 4096


class Calculator(_AseCalculator):
    """NeuralIL potential for ASE.

    model: a path written by ``nf.save`` or a ``NeuralIL`` (then pass ``params``).
    backend: "reference" | "numba" | "triton" | "auto".
    skin: Verlet skin, Å; the list is rebuilt when an atom moved more than skin / 2.
    dtype: "float64" (default) or "float32".
    committee: with ``params`` given, True when they are a committee (a leading axis K on
    every leaf); a path written by ``save_committee`` says so itself.  A committee gives
    the members' mean energy, energies, forces and stress, plus "energy_uncertainty"
    (eV, standard deviation over members) and "forces_uncertainty" ((N,) eV/Å,
    sqrt(mean_k |F_k - F_mean|^2)).
    block_atoms: systems larger than this are evaluated this many centres at a time, so
    that memory beyond the neighbour list does not grow with N (None: all at once).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress",
                              "energy_uncertainty", "forces_uncertainty"]

    def __init__(self, model, params=None, backend: str = "auto", skin: float = 0.5,
                 dtype: str = "float64", committee: bool = False,
                 block_atoms: int | None = 16384, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .committee import load_any

            model, params, size = load_any(model)
            committee = size is not None
        if committee:
            from .committee import committee_size

            committee_size(params)  # validates the leading axis
        if params is None:
            raise ValueError("pass the parameters with the model, or a path written by nf.save")
        model.check_params(params, committee=committee)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.model = model
        self.params = params
        self.backend = resolve_backend(backend)
        self.skin = validate_skin(skin)
        self.dtype = dtype
        self.committee = bool(committee)
        if block_atoms is not None and int(block_atoms) < 1:
            raise ValueError(f"block_atoms must be >= 1 or None, got {block_atoms}")
        self.block_atoms = None if block_atoms is None else int(block_atoms)
        self._block_pairs = None
        self._nl = None
        self._key = None

    def _neighbors(self, system):
        key = (system.n_atoms, tuple(system.pbc))
        if self._nl is None or key != self._key:
            self._nl = allocate(system.positions, system.cell, system.pbc, self.model.r_cut,
                                self.skin, backend=self.backend)
            self._key = key
            return self._nl
        nl = _update_jit(self._nl, jnp.asarray(system.positions, self._nl.reference_positions.dtype),
                         jnp.asarray(system.cell, self._nl.reference_cell.dtype))
        if bool(nl.did_overflow):
            nl = reallocate(nl, system.positions, system.cell)
        self._nl = nl
        return nl

    def _evaluate(self, args, n_atoms, stress):
        if self.block_atoms is None or n_atoms <= self.block_atoms:
            return evaluate_jit(*args, backend=self.backend, stress=stress)
        if self._block_pairs is None:
            self._block_pairs = _window(int(block_pairs_needed(args[5], n_atoms,
                                                               self.block_atoms)))
        while True:
            out = evaluate_jit(*args, backend=self.backend, stress=stress,
                               block_atoms=self.block_atoms, block_pairs=self._block_pairs)
            need = int(out.pop("max_block_pairs"))
            if need <= self._block_pairs:
                return out
            self._block_pairs = _window(need)  # a block outgrew its window: resize and redo

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        system = as_system(self.atoms)
        if self.dtype == "float32":
            # An atom unwrapped far from the cell loses float32 resolution (7 000 Å: 5e-4
            # Å): atoms beyond 4 cells are evaluated as their image in the cell (same
            # energy and forces); rare enough that the neighbour list's skin test is
            # unaffected.  float64 keeps 1e-12 Å there and is left as it is.
            system = dataclasses.replace(system, positions=wrap_positions(
                system.positions, system.cell, system.pbc, beyond=4))
        species = species_indices(system.numbers, self.model.species)
        periodic = bool(system.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions (pbc = "
                f"{system.pbc.tolist()}): the volume of a cluster or slab is not defined")
        with jax.enable_x64(self.dtype == "float64"):
            nl = self._neighbors(system)
            dt = jnp.float64 if self.dtype == "float64" else jnp.float32
            args = (self.model, self.params, jnp.asarray(system.positions, dt),
                    jnp.asarray(system.cell, dt), jnp.asarray(species), nl.centers,
                    nl.neighbors, nl.shifts)
            if self.committee:
                from .committee import committee_evaluate_jit, summarize

                out = summarize(committee_evaluate_jit(*args, backend=self.backend,
                                                       stress=periodic))
            else:
                out = self._evaluate(args, system.n_atoms, periodic)
            out = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
        self.results["energy"] = float(out["energy"])
        self.results["free_energy"] = float(out["energy"])
        self.results["energies"] = out["energies"]
        self.results["forces"] = out["forces"]
        if periodic:
            self.results["stress"] = out["stress"]
        if self.committee:
            self.results["energy_uncertainty"] = float(out["energy_uncertainty"])
            self.results["forces_uncertainty"] = out["forces_uncertainty"]
