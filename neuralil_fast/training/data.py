"""Padded, stacked training data with precomputed neighbour pairs.

Positions do not change during training, so every configuration's neighbour
pairs are found once (``neighbors.neighbor_pairs``) and stored.  Configurations of
different sizes are padded to static shapes so that the jitted step compiles
once:

    positions (C, N, 3) Å       padding atoms: masked, species 0, no pairs
    cell (C, 3, 3) Å            species (C, N) int32   atom_mask (C, N) 0/1
    centers/neighbors (C, P)    padding pairs carry centre = neighbour = N
    shifts (C, P, 3) int32      energy (C,) eV   forces (C, N, 3) eV/Å   n_atoms (C,)
    force_mask (C,) 0/1         1 where the configuration carries forces (else its
                                forces are zeros and enter no loss or metric)

N is the largest atom count, P the largest pair count (or a given capacity).

Data of mixed sizes can instead be kept as size groups (:class:`GroupedData`, from
:func:`group_configurations`): each group's configurations padded to that group's own
largest atom and pair counts only, so memory follows the sum over the groups, never
all configurations x the largest.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import species_indices
from ..neighbors import neighbor_pairs

__all__ = ["PaddedData", "pad_configurations", "split_indices", "take", "closest_approach",
           "force_atom_mask", "SizeGroup", "size_groups", "epoch_slots", "narrow",
           "species_counts", "common_energy_per_atom", "compositions_vary",
           "fit_species_energies", "GroupedData", "group_configurations", "regroup"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedData:
    positions: jax.Array
    cell: jax.Array
    species: jax.Array
    atom_mask: jax.Array
    centers: jax.Array
    neighbors: jax.Array
    shifts: jax.Array
    energy: jax.Array
    forces: jax.Array
    n_atoms: jax.Array
    force_mask: jax.Array

    def __len__(self):
        return int(self.positions.shape[0])

    @property
    def max_atoms(self) -> int:
        return int(self.positions.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.centers.shape[1])


def force_atom_mask(data: PaddedData):
    """(C, N) 0/1: the atoms whose forces are labelled (real atoms of configurations with forces)."""
    return data.atom_mask * data.force_mask[:, None]


def take(data: PaddedData, idx) -> PaddedData:
    """Rows ``idx`` of every array (works inside jit)."""
    return jax.tree.map(lambda a: a[idx], data)


@dataclasses.dataclass(frozen=True)
class SizeGroup:
    """Configurations ``indices`` (into a PaddedData) that fit ``atoms`` atom slots and
    ``pairs`` pair slots: their batches run on arrays narrowed to that window."""

    atoms: int
    pairs: int
    indices: np.ndarray


def size_groups(data: PaddedData, max_groups: int, batch: int) -> list[SizeGroup]:
    """Split the configurations of ``data`` by atom count into at most ``max_groups``
    groups, smallest first, minimising the atom slots an epoch computes.

    An epoch runs ceil(n_g / batch) batches of ``batch`` rows, each padded to its group's
    largest atom count a_g: the cost Σ_g ceil(n_g / batch) batch a_g is minimised over
    the splits of the sorted atom counts into contiguous runs (dynamic programming over
    the distinct counts).  One group (``max_groups`` 1) is the whole set at full size.
    """
    n_pairs = data.n_pairs if isinstance(data, GroupedData) else _pair_counts(data)
    return _size_groups(np.asarray(data.n_atoms).astype(np.int64), n_pairs, data.max_atoms,
                        data.capacity, max_groups, batch)


def _size_groups(n_atoms, n_pairs, max_atoms: int, capacity: int, max_groups: int,
                 batch: int) -> list[SizeGroup]:
    """:func:`size_groups` of configurations of ``n_atoms`` atoms and ``n_pairs`` pairs
    (C,), stored ``max_atoms`` x ``capacity`` wide (the window of one group)."""
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    if max_groups == 1 or len(n_atoms) == 0:
        return [SizeGroup(max_atoms, capacity, np.arange(len(n_atoms)))]
    sizes, counts = np.unique(n_atoms, return_counts=True)
    m = len(sizes)
    upto = np.concatenate([[0], np.cumsum(counts)])        # configurations below size i

    def cost(i, j):  # sizes[i..j] as one group (vectorised over i)
        return np.ceil((upto[j + 1] - upto[i]) / batch) * batch * sizes[j]

    # best[g][j]: the least cost of sizes[0..j] in exactly g + 1 groups; start[g][j]: the
    # first size of the last of those groups
    best = [cost(0, np.arange(m)).astype(float)]
    start = [np.zeros(m, np.int64)]
    for g in range(1, min(max_groups, m)):
        b, st = np.full(m, np.inf), np.zeros(m, np.int64)
        for j in range(g, m):
            i = np.arange(g, j + 1)
            total = best[g - 1][i - 1] + cost(i, j)
            k = int(np.argmin(total))
            b[j], st[j] = total[k], i[k]
        best.append(b)
        start.append(st)
    g = int(np.argmin([b[m - 1] for b in best]))      # fewest groups among equal costs
    groups, j = [], m - 1
    while g >= 0:
        i = int(start[g][j])
        members = np.flatnonzero((n_atoms >= sizes[i]) & (n_atoms <= sizes[j]))
        groups.append(SizeGroup(int(sizes[j]), max(1, int(n_pairs[members].max())), members))
        j, g = i - 1, g - 1
    return groups[::-1]


def epoch_slots(groups: list[SizeGroup], batch: int) -> int:
    """The atom slots an epoch computes: ceil(n_g / batch) batches of ``batch`` rows of
    ``atoms`` slots per group (the cost :func:`size_groups` minimises)."""
    return sum(-(-len(g.indices) // batch) * batch * g.atoms for g in groups)


def narrow(batch: PaddedData, atoms: int, pairs: int) -> PaddedData:
    """The first ``atoms`` atom slots and ``pairs`` pair slots of every configuration.

    Valid for configurations of at most ``atoms`` atoms and ``pairs`` pairs (a
    :class:`SizeGroup`): their real atoms and pairs come first, and the padding index
    N of the pair rows becomes ``atoms``.  Works inside jit (static sizes).
    """
    N, P = batch.positions.shape[1], batch.centers.shape[1]
    if atoms == N and pairs == P:
        return batch
    atom_slots = slice(None), slice(0, atoms)
    pair_slots = slice(None), slice(0, pairs)

    def index(a):
        return jnp.minimum(a[pair_slots], atoms)

    return dataclasses.replace(
        batch, positions=batch.positions[atom_slots], species=batch.species[atom_slots],
        atom_mask=batch.atom_mask[atom_slots], forces=batch.forces[atom_slots],
        centers=index(batch.centers), neighbors=index(batch.neighbors),
        shifts=batch.shifts[pair_slots])


def host_pairs(conf, r_cut: float, backend: str):
    """(i, j, S) numpy pairs of one configuration sorted by (i, j, S), found once on the host.

    The kernels' neighbour search for a kernel backend; for "reference" ASE's
    ``neighbor_list("ijS")`` (the same pair set as ``neighbor_pairs_reference``, by the
    convention of ``neighbors``, and much faster than the brute force on the host).
    """
    from ..backends import resolve_backend

    backend = resolve_backend(backend)
    if backend == "reference":
        from ase import Atoms
        from ase.neighborlist import neighbor_list

        atoms = Atoms(numbers=conf.numbers, positions=conf.positions, cell=conf.cell,
                      pbc=conf.pbc)
        i, j, S = neighbor_list("ijS", atoms, float(r_cut))
        order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
        return i[order], j[order], S[order]
    # straight from the host kernel: a NeighborList (allocate) would build device arrays
    # of each configuration's own capacity, an eager compilation per new pair count
    with jax.enable_x64(True):  # host pairs from float64 positions
        return neighbor_pairs(positions=np.asarray(conf.positions, np.float64), cell=conf.cell,
                              pbc=conf.pbc, r_cut=r_cut, backend=backend)


def _host_rows(configs, species: tuple, r_cut: float, backend: str, max_atoms=None,
               progress=None) -> list[dict]:
    """One checked row per configuration (unpadded numpy: positions, cell, species,
    centers, neighbors, shifts, energy, forces or None), its pairs found on the host."""
    if not configs:
        raise ValueError("no configurations to pad")
    rows = []
    for k, c in enumerate(configs):
        if c.energy is None:
            raise ValueError(f"configuration {k} lacks an energy")
        if c.n_atoms == 0:  # its energy per atom, a loss term, would be 0 / 0
            raise ValueError(f"configuration {k} has no atoms")
        if max_atoms is not None and c.n_atoms > max_atoms:
            raise ValueError(f"configuration {k} has {c.n_atoms} atoms, more than {max_atoms}")
        try:
            sp = species_indices(c.numbers, tuple(species))
        except ValueError as err:
            raise ValueError(f"configuration {k}: {err}") from None
        i, j, S = host_pairs(c, r_cut, backend)
        rows.append(dict(positions=c.positions, cell=c.cell, species=sp, centers=i,
                         neighbors=j, shifts=S, energy=c.energy, forces=c.forces))
        if progress is not None:
            progress()
    return rows


def _data_rows(data: PaddedData) -> list[dict]:
    """The rows of every configuration of ``data`` (as :func:`_host_rows` gives them)."""
    arrays = {f.name: np.asarray(getattr(data, f.name)) for f in dataclasses.fields(data)}
    rows = []
    for k, p in enumerate(_pair_counts(data)):
        n = int(arrays["n_atoms"][k])
        rows.append(dict(
            positions=arrays["positions"][k, :n], cell=arrays["cell"][k],
            species=arrays["species"][k, :n], centers=arrays["centers"][k, :p],
            neighbors=arrays["neighbors"][k, :p], shifts=arrays["shifts"][k, :p],
            energy=arrays["energy"][k],
            forces=arrays["forces"][k, :n] if arrays["force_mask"][k] else None))
    return rows


def _stack(rows: list[dict], n_max: int, p_max: int, dtype) -> PaddedData:
    """``rows`` padded to ``n_max`` atoms and ``p_max`` pairs (see the module docstring)."""
    C = len(rows)
    out = dict(
        positions=np.zeros((C, n_max, 3), dtype), cell=np.zeros((C, 3, 3), dtype),
        species=np.zeros((C, n_max), np.int32), atom_mask=np.zeros((C, n_max), dtype),
        centers=np.full((C, p_max), n_max, np.int32),
        neighbors=np.full((C, p_max), n_max, np.int32),
        shifts=np.zeros((C, p_max, 3), np.int32), energy=np.zeros((C,), np.float64),
        forces=np.zeros((C, n_max, 3), dtype), n_atoms=np.zeros((C,), dtype),
        force_mask=np.zeros((C,), dtype),
    )
    for k, r in enumerate(rows):
        n, p = len(r["species"]), len(r["centers"])
        if p > p_max:
            raise ValueError(f"configuration {k} has {p} pairs, more than the capacity {p_max}")
        out["positions"][k, :n] = r["positions"]
        out["cell"][k] = r["cell"]
        out["species"][k, :n] = r["species"]
        out["atom_mask"][k, :n] = 1
        out["centers"][k, :p] = r["centers"]
        out["neighbors"][k, :p] = r["neighbors"]
        out["shifts"][k, :p] = r["shifts"]
        out["energy"][k] = r["energy"]
        if r["forces"] is not None:
            out["forces"][k, :n] = r["forces"]
            out["force_mask"][k] = 1
        out["n_atoms"][k] = n
    out["energy"] = out["energy"].astype(dtype)
    return PaddedData(**out)


def _capacity(max_pairs: int) -> int:
    """The pair slots of a set padded as one: its largest pair count, at least 16."""
    return max(16, int(max_pairs))


def _pair_counts(data: PaddedData) -> np.ndarray:
    """(C,) int: the real (not padding) pairs of each configuration."""
    return np.sum(np.asarray(data.centers) < data.max_atoms, axis=1)


def pad_configurations(configs, species: tuple, r_cut: float, backend: str = "auto",
                       dtype=np.float32, max_atoms: int | None = None,
                       capacity: int | None = None, progress=None) -> PaddedData:
    """Stack ``io.Configuration`` objects into a :class:`PaddedData` of numpy arrays.

    species: the model's element symbols (index order); r_cut Å: the model's cutoff.
    A configuration without forces gets zero forces and ``force_mask`` 0.
    Raises ValueError for configurations without an energy or without atoms, or with
    elements outside ``species``.
    """
    rows = _host_rows(configs, species, r_cut, backend, max_atoms, progress)
    n_max = max(c.n_atoms for c in configs) if max_atoms is None else int(max_atoms)
    p_max = _capacity(max(len(r["centers"]) for r in rows)) if capacity is None else capacity
    return _stack(rows, n_max, int(p_max), dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupedData:
    """A data set kept as size groups: ``parts[g]`` (a :class:`PaddedData`) holds the
    configurations ``groups[g].indices`` (ascending) padded to that group's window
    (``groups[g].atoms`` atoms, ``groups[g].pairs`` pairs) only.

    Per configuration, in data-set order: ``n_atoms``, ``n_pairs``, ``energy``,
    ``force_mask`` (C,); ``forces`` (C, max_atoms, 3) and ``atom_mask`` (C, max_atoms) are
    assembled on first use (validation metrics).  ``Trainer`` takes it for ``train`` or
    ``valid`` and keeps each part, as it is, on the device.
    """

    groups: tuple
    parts: tuple

    def __len__(self):
        return sum(len(g.indices) for g in self.groups)

    @property
    def max_atoms(self) -> int:
        return max(g.atoms for g in self.groups)

    @property
    def capacity(self) -> int:
        """The pair slots of the set padded as one (by pad_configurations' rule)."""
        return _capacity(max(g.pairs for g in self.groups))

    def _gather(self, per_part, shape=()):
        """(C, *shape): ``per_part(part)`` of each group placed at its indices."""
        values = [np.asarray(per_part(part)) for part in self.parts]
        out = np.zeros((len(self),) + shape, values[0].dtype)
        for g, value in zip(self.groups, values):
            out[(g.indices,) + tuple(slice(0, n) for n in value.shape[1:])] = value
        return out

    @functools.cached_property
    def n_atoms(self) -> np.ndarray:
        return self._gather(lambda p: p.n_atoms)

    @functools.cached_property
    def n_pairs(self) -> np.ndarray:
        return self._gather(_pair_counts)

    @functools.cached_property
    def energy(self) -> np.ndarray:
        return self._gather(lambda p: p.energy)

    @functools.cached_property
    def force_mask(self) -> np.ndarray:
        return self._gather(lambda p: p.force_mask)

    @functools.cached_property
    def forces(self) -> np.ndarray:
        return self._gather(lambda p: p.forces, (self.max_atoms, 3))

    @functools.cached_property
    def atom_mask(self) -> np.ndarray:
        return self._gather(lambda p: p.atom_mask, (self.max_atoms,))


def _parts(rows: list[dict], groups: list[SizeGroup], dtype) -> GroupedData:
    return GroupedData(tuple(groups), tuple(_stack([rows[i] for i in g.indices], g.atoms,
                                                   g.pairs, dtype) for g in groups))


def group_configurations(configs, species: tuple, r_cut: float, backend: str = "auto",
                         dtype=np.float32, max_groups: int = 1, batch: int = 1,
                         progress=None) -> GroupedData:
    """``configs`` as :class:`GroupedData`: the size groups :func:`size_groups` chooses for
    ``max_groups`` and ``batch``, each padded to its own window, without ever padding all
    configurations to the largest.  Arguments and errors as :func:`pad_configurations`;
    its parts equal ``narrow(take(pad_configurations(...), g.indices), g.atoms, g.pairs)``."""
    rows = _host_rows(configs, species, r_cut, backend, progress=progress)
    n_atoms = np.array([len(r["species"]) for r in rows])
    n_pairs = np.array([len(r["centers"]) for r in rows])
    groups = _size_groups(n_atoms, n_pairs, int(n_atoms.max()), _capacity(n_pairs.max()),
                          max_groups, batch)
    return _parts(rows, groups, dtype)


def regroup(data: PaddedData | GroupedData, groups: list[SizeGroup]) -> GroupedData:
    """``data`` (host numpy) re-stored as the size groups ``groups``."""
    if isinstance(data, GroupedData):
        rows = [None] * len(data)
        for g, part in zip(data.groups, data.parts):
            for i, row in zip(g.indices, _data_rows(part)):
                rows[i] = row
        dtype = data.parts[0].positions.dtype
    else:
        rows, dtype = _data_rows(data), data.positions.dtype
    return _parts(rows, groups, dtype)


def closest_approach(data: PaddedData, n_species: int, r_cut: float) -> np.ndarray:
    """(S, S) Å: the shortest distance of each species pair over all stored pairs of ``data``.

    A species pair that never comes within ``r_cut`` gets ``r_cut``.  This is the
    onset table for ``NeuralIL(core_repulsion=...)``: no pair of ``data`` then feels the
    wall.
    """
    if isinstance(data, GroupedData):
        return np.min([closest_approach(p, n_species, r_cut) for p in data.parts], axis=0)
    out = np.full((n_species, n_species), float(r_cut))
    pos = np.asarray(data.positions, np.float64)
    cell = np.asarray(data.cell, np.float64)
    for k in range(len(data)):
        c, j = np.asarray(data.centers[k]), np.asarray(data.neighbors[k])
        real = c < pos.shape[1]
        c, j = c[real], j[real]
        d = pos[k, j] - pos[k, c] + np.asarray(data.shifts[k])[real] @ cell[k]
        r = np.linalg.norm(d, axis=1)
        sp = np.asarray(data.species[k])
        np.minimum.at(out, (sp[c], sp[j]), r)
    return np.minimum(out, out.T)


def species_counts(data: PaddedData, n_species: int) -> np.ndarray:
    """(C, S) int: the atoms of each species in each configuration (padding left out)."""
    if isinstance(data, GroupedData):
        return data._gather(lambda p: species_counts(p, n_species), (n_species,))
    sp = np.asarray(data.species)
    real = np.asarray(data.atom_mask) > 0
    return np.stack([np.sum(real & (sp == s), axis=1) for s in range(n_species)], axis=1)


def common_energy_per_atom(n_atoms, energy):
    """The least-squares c of energy ≈ N c: Σ N E / Σ N² (eV per atom).

    n_atoms (C,); energy (C,) -> float, or (C, K) -> (K,) (one c per column)."""
    n = np.asarray(n_atoms, np.float64)
    return np.tensordot(n, np.asarray(energy, np.float64), axes=(0, 0)) / (n @ n)


def compositions_vary(counts) -> bool:
    """Whether the rows of counts (C, S) are not all proportional (the species' shares
    differ between configurations): only then can per-species energies be told apart."""
    counts = np.asarray(counts, np.float64)
    fractions = counts / counts.sum(axis=1, keepdims=True)
    return bool(np.ptp(fractions, axis=0).max() > 1e-9)


def fit_species_energies(counts, energy) -> np.ndarray:
    """(S,) eV per atom: reference energies b with counts @ b ≈ energy (least squares).

    counts (C, S) atoms of each species; energy (C,) eV.  Solved in two stages, so that
    what the data cannot tell apart stays equal: one common energy per atom c
    (:func:`common_energy_per_atom`), then the smallest deviations δ (minimum norm least
    squares on the residual), b = c + δ.  Data of one composition (all rows proportional,
    :func:`compositions_vary` false) gives b = c for every species; a species absent from
    the data gets c.
    """
    counts = np.asarray(counts, np.float64)
    energy = np.asarray(energy, np.float64)
    n = counts.sum(axis=1)
    c = common_energy_per_atom(n, energy)
    delta = np.linalg.lstsq(counts, energy - n * c, rcond=None)[0]
    return c + delta


def to_device(data: PaddedData) -> PaddedData:
    return jax.tree.map(jnp.asarray, data)


def split_indices(n: int, n_valid: int, seed: int = 0):
    """(train, valid) index arrays: ``default_rng(seed).permutation(n)``, last n_valid validate."""
    if not 0 < n_valid < n:
        raise ValueError(f"--n-valid must be between 1 and {n - 1} for {n} configurations, "
                         f"got {n_valid}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n - n_valid], perm[n - n_valid:]
