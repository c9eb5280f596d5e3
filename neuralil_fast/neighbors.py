"""Neighbour pairs: the brute-force reference and the jittable NeighborList value.

Convention (``ase.neighborlist.neighbor_list("ijS")``): every ordered pair
(i, j, S), S an integer image shift, with |x_j + S @ cell - x_i| < r_cut over
all periodic images, except i == j with S == 0.  Pairs at distance exactly 0
between distinct atoms are kept here (as ASE does); the descriptors ignore them.

Pair layout, shared by every backend and read by the descriptor kernels:
pairs are sorted by centre (CSR order), arrays have a static ``capacity``, and
padding entries have centre = neighbour = n_atoms and shift 0.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .backends import resolve_backend
from .geometry import (_complete_cell, as_system, check_cell, check_positions,
                       perpendicular_widths, validate_cutoff, validate_skin)

__all__ = ["neighbor_pairs", "neighbor_pairs_reference", "NeighborList", "allocate", "update"]


def _image_range(full_cell: np.ndarray, pbc: np.ndarray, r_cut: float) -> np.ndarray:
    """(3,) largest |S_k| needed between positions wrapped into [0, 1)."""
    widths = perpendicular_widths(full_cell)
    n = np.where(pbc, np.ceil(r_cut / widths).astype(int), 0)
    return n


def neighbor_pairs_reference(positions, cell, pbc, r_cut):
    """Brute-force pairs on the host: (i (P,), j (P,), S (P, 3)) int arrays, sorted by (i, j, S).

    Every atom against every periodic image of every atom; O(N^2 * images).
    """
    positions = check_positions(positions).astype(np.float64)
    cell, pbc = check_cell(cell, pbc)
    r_cut = validate_cutoff(r_cut)
    if len(positions) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    full = _complete_cell(cell, pbc)
    frac = np.linalg.solve(full.T, positions.T).T
    # Integer offsets that wrap each atom into the cell along periodic directions.
    offset = np.where(pbc, -np.floor(frac), 0.0).astype(np.int64)
    wrapped = positions + offset @ full
    n = _image_range(full, pbc, r_cut)
    # Wrapped fractional differences lie in (-1, 1): one more image each way covers them.
    n = np.where(pbc, n + 1, 0)
    grid = np.stack(
        np.meshgrid(*[np.arange(-m, m + 1) for m in n], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    image_vec = grid @ full
    out_i, out_j, out_s = [], [], []
    n_atoms = len(positions)
    chunk = max(1, 2_000_000 // max(1, n_atoms * len(grid)))
    for start in range(0, n_atoms, chunk):
        idx = np.arange(start, min(n_atoms, start + chunk))
        # d[a, s, j] = x_j + image_s - x_a
        d = wrapped[None, None, :, :] + image_vec[None, :, None, :] - wrapped[idx, None, None, :]
        dist2 = np.einsum("asjk,asjk->asj", d, d)
        hit = dist2 < r_cut * r_cut
        a, s, j = np.nonzero(hit)
        i = idx[a]
        keep = ~((i == j) & np.all(grid[s] == 0, axis=1))
        i, s, j = i[keep], s[keep], j[keep]
        out_i.append(i)
        out_j.append(j)
        out_s.append(grid[s] + offset[j] - offset[i])
    i = np.concatenate(out_i)
    j = np.concatenate(out_j)
    S = np.concatenate(out_s).reshape(-1, 3)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order]


def neighbor_pairs(atoms=None, r_cut: float = 3.5, backend: str = "auto", *, positions=None,
                   cell=None, pbc=None):
    """Neighbour pairs of ASE ``atoms`` (or arrays) as numpy (i, j, S), sorted by (i, j, S).

    Same sets as ``ase.neighborlist.neighbor_list("ijS", atoms, r_cut)`` for every backend.
    """
    system = as_system(atoms, positions=positions, cell=cell, pbc=pbc)
    r_cut = validate_cutoff(r_cut)
    backend = resolve_backend(backend)
    if backend == "reference":
        return neighbor_pairs_reference(system.positions, system.cell, system.pbc, r_cut)
    i, j, S = _host_pairs(system.positions, system.cell, system.pbc, r_cut, backend)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order]


# ---------------------------------------------------------------------------
# The NeighborList value (jax-md partition style)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NeighborList:
    """A neighbour list as a value: static capacity and format, traced arrays, an error flag.

    centers, neighbors: (capacity,) int32, centre-sorted; padding = n_atoms.
    shifts: (capacity, 3) int32 image shifts, displacement = x[j] - x[i] + shifts @ cell.
    n_pairs: () int32 true number of pairs found at the last build (may exceed capacity).
    reference_positions: (N, 3) positions at the last build, Å.
    reference_cell: (3, 3) cell at the last build, Å.
    did_overflow: () bool, sticky; when True the arrays are incomplete: reallocate.
    Static: capacity, r_cut (of the model), skin (Å), pbc, backend, capacity_multiplier,
    max_images (the reference build's image grid), bin_grid (the Triton build's cell grid).
    """

    centers: jax.Array
    neighbors: jax.Array
    shifts: jax.Array
    n_pairs: jax.Array
    reference_positions: jax.Array
    reference_cell: jax.Array
    did_overflow: jax.Array
    capacity: int = dataclasses.field(metadata=dict(static=True))
    r_cut: float = dataclasses.field(metadata=dict(static=True))
    skin: float = dataclasses.field(metadata=dict(static=True))
    pbc: tuple = dataclasses.field(metadata=dict(static=True))
    backend: str = dataclasses.field(metadata=dict(static=True))
    capacity_multiplier: float = dataclasses.field(metadata=dict(static=True))
    max_images: tuple = dataclasses.field(metadata=dict(static=True))
    bin_grid: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def n_atoms(self) -> int:
        return self.reference_positions.shape[0]

    def update(self, positions, cell=None) -> "NeighborList":
        return update(self, positions, cell)

    def displacements(self, positions, cell) -> jax.Array:
        """(capacity, 3) pair vectors x_j + S @ cell - x_i, Å; padding rows are 0."""
        return pair_displacements(positions, cell, self.centers, self.neighbors, self.shifts)


def times_3x3(v, m):
    """v @ m for v (..., 3) and m (3, 3), as three broadcast multiply-adds.

    XLA:CPU hands even a dot with a contraction of 3 to a library call: in the vmapped
    training step the batch's ``shifts @ cell`` (8 x 3 920 pair rows) took ~0.9 ms there,
    while as element-wise ops it fuses into the gathers around it.
    """
    return v[..., 0:1] * m[0] + v[..., 1:2] * m[1] + v[..., 2:3] * m[2]


def pair_displacements(positions, cell, centers, neighbors, shifts):
    """(P, 3) x_j + S @ cell - x_i, differentiable in positions and cell; padding rows give 0."""
    n = positions.shape[0]
    valid = centers < n
    xi = positions[jnp.where(valid, centers, 0)]
    xj = positions[jnp.where(valid, neighbors, 0)]
    d = xj - xi + times_3x3(shifts.astype(positions.dtype), cell)
    return jnp.where(valid[:, None], d, 0.0)


def allocate(positions, cell, pbc, r_cut: float, skin: float = 0.0, *,
             capacity_multiplier: float = 1.25, backend: str = "auto",
             capacity: int | None = None) -> NeighborList:
    """Build a list on the host with room for ``capacity_multiplier`` times today's pairs.

    Pairs are kept within r_cut + skin, so ``update`` rebuilds only when an atom has
    moved more than skin / 2 since the last build (or the cell changed).
    """
    positions = check_positions(np.asarray(positions))
    cell, pbc = check_cell(cell if cell is not None else np.zeros((3, 3)), pbc)
    r_cut = validate_cutoff(r_cut)
    skin = validate_skin(skin)
    if capacity_multiplier < 1.0:
        raise ValueError(f"capacity_multiplier must be >= 1, got {capacity_multiplier}")
    backend = resolve_backend(backend)
    full = _complete_cell(cell, pbc)
    # The jittable reference build enumerates a static image grid; keep room for a
    # moderately compressed cell (the flag is raised if it ever needs more).
    max_images = tuple(int(m) for m in np.where(pbc, _image_range(full, pbc, (r_cut + skin) * 1.25) + 1, 0))
    i, j, S = neighbor_pairs_reference(positions, cell, pbc, r_cut + skin) if backend == "reference" \
        else _host_pairs(positions, cell, pbc, r_cut + skin, backend)
    n_pairs = len(i)
    if capacity is None:
        capacity = max(16, int(math.ceil(n_pairs * capacity_multiplier)))
    dtype = jax.dtypes.canonicalize_dtype(positions.dtype)
    nl = NeighborList(
        centers=jnp.zeros(capacity, jnp.int32),
        neighbors=jnp.zeros(capacity, jnp.int32),
        shifts=jnp.zeros((capacity, 3), jnp.int32),
        n_pairs=jnp.asarray(0, jnp.int32),
        reference_positions=jnp.asarray(positions, dtype),
        reference_cell=jnp.asarray(cell, dtype),
        did_overflow=jnp.asarray(False),
        capacity=int(capacity),
        r_cut=r_cut,
        skin=float(skin),
        pbc=tuple(bool(p) for p in pbc),
        backend=backend,
        capacity_multiplier=float(capacity_multiplier),
        max_images=max_images,
        bin_grid=_bin_grid(positions, cell, pbc, r_cut + skin) if backend == "triton" else (),
    )
    return _fill(nl, i, j, S, positions, cell)


def _bin_grid(positions, cell, pbc, r_list):
    from .kernels.gpu.neighbors import bin_grid

    # as max_images: room for a cell (or an open extent) 20% smaller before the
    # jitted build flags itself and the caller reallocates
    return bin_grid(positions, cell, pbc, r_list, margin=1.25)


def _host_pairs(positions, cell, pbc, r_cut, backend):
    from .kernels_api import host_pairs

    return host_pairs(positions, cell, pbc, r_cut, backend)


def _fill(nl: NeighborList, i, j, S, positions, cell) -> NeighborList:
    n = len(positions)
    cap = nl.capacity
    count = len(i)
    if count > 1 and np.any(i[1:] < i[:-1]):  # the kernels' pairs come centre-sorted already
        order = np.argsort(i, kind="stable")
        i, j, S = i[order], j[order], S[order]
    k = min(count, cap)

    def padded(a, fill):
        # One host copy per array at a time: at 10^6 atoms each is tens of MB.
        out = np.full((cap,) + a.shape[1:], fill, np.int32)
        out[:k] = a[:k]
        return jnp.asarray(out)

    return dataclasses.replace(
        nl,
        centers=padded(i, n),
        neighbors=padded(j, n),
        shifts=padded(S, 0),
        n_pairs=jnp.asarray(count, jnp.int32),
        did_overflow=jnp.asarray(count > cap),
    )


def needs_rebuild(nl: NeighborList, positions, cell) -> jax.Array:
    """() bool: some atom moved more than skin / 2, or the cell changed, since the last build."""
    disp2 = jnp.sum((positions - nl.reference_positions) ** 2, axis=-1)
    moved = jnp.max(disp2, initial=0.0) > (0.5 * nl.skin) ** 2
    cell_changed = jnp.any(jnp.abs(cell - nl.reference_cell) > 1e-10)
    return moved | cell_changed


def _build_reference_jax(nl: NeighborList, positions, cell):
    """Dense O(N^2 * images) build in pure JAX over the static image grid of ``nl``."""
    n = positions.shape[0]
    r_list = nl.r_cut + nl.skin
    grid = np.stack(
        np.meshgrid(*[np.arange(-m, m + 1) for m in nl.max_images], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    pbc = jnp.asarray(nl.pbc)
    full = cell  # open directions have zero images, so their vectors never enter
    frac = jnp.linalg.solve(_complete_cell(cell, nl.pbc).T, positions.T).T
    offset = jnp.where(pbc, -jnp.floor(frac), 0.0).astype(jnp.int32)
    wrapped = positions + offset.astype(positions.dtype) @ full
    image_vec = jnp.asarray(grid, positions.dtype) @ full
    d = wrapped[None, None, :, :] + image_vec[None, :, None, :] - wrapped[:, None, None, :]
    dist2 = jnp.sum(d * d, axis=-1)  # (i, s, j)
    zero_shift = np.all(grid == 0, axis=1)
    self_pair = (jnp.arange(n)[:, None, None] == jnp.arange(n)[None, None, :]) & zero_shift[None, :, None]
    hit = (dist2 < r_list * r_list) & ~self_pair
    count = jnp.sum(hit, dtype=jnp.int32)
    a, s, j = jnp.nonzero(hit, size=nl.capacity, fill_value=(n, 0, n))
    valid = a < n
    S = jnp.asarray(grid, jnp.int32)[s] + offset[jnp.where(valid, j, 0)] - offset[jnp.where(valid, a, 0)]
    S = jnp.where(valid[:, None], S, 0)
    # The static image grid was sized at allocation; a thinner cell needs more images.
    # Widths of the completed cell (as on the host): open directions' vectors may be
    # zero or skewed and must not shrink the periodic widths.
    widths = perpendicular_widths(_complete_cell(cell, nl.pbc))
    need = jnp.where(pbc, jnp.ceil(r_list / widths) + 1, 0)
    too_few_images = jnp.any(need > jnp.asarray(nl.max_images))
    return a.astype(jnp.int32), j.astype(jnp.int32), S, count, too_few_images


def update(nl: NeighborList, positions, cell=None) -> NeighborList:
    """Jittable: rebuild when needed; raise ``did_overflow`` (sticky) when the capacity is short.

    Never truncates silently: on overflow the returned list is incomplete and
    flagged, and the caller reallocates with :func:`allocate` on the host.
    """
    positions = jnp.asarray(positions)
    cell = nl.reference_cell if cell is None else jnp.asarray(cell, nl.reference_cell.dtype)

    def rebuild(_):
        if nl.backend == "reference":
            c, j, S, count, bad = _build_reference_jax(nl, positions, cell)
        else:
            from .kernels_api import jax_build_pairs

            c, j, S, count, bad = jax_build_pairs(positions, cell, nl)
        overflow = (count > nl.capacity) | bad
        return c, j, S, count, overflow, positions, cell

    def keep(_):
        return (nl.centers, nl.neighbors, nl.shifts, nl.n_pairs, jnp.asarray(False),
                nl.reference_positions, nl.reference_cell)

    c, j, S, count, overflow, ref_pos, ref_cell = jax.lax.cond(
        needs_rebuild(nl, positions, cell), rebuild, keep, None
    )
    return dataclasses.replace(
        nl, centers=c, neighbors=j, shifts=S, n_pairs=count,
        reference_positions=ref_pos.astype(nl.reference_positions.dtype),
        reference_cell=ref_cell.astype(nl.reference_cell.dtype),
        did_overflow=nl.did_overflow | overflow,
    )


def reallocate(nl: NeighborList, positions, cell=None) -> NeighborList:
    """Host: a fresh list for ``positions`` with the same static settings and a larger capacity."""
    cell = np.asarray(nl.reference_cell if cell is None else cell)
    return allocate(np.asarray(positions), cell, np.asarray(nl.pbc), nl.r_cut, nl.skin,
                    capacity_multiplier=nl.capacity_multiplier, backend=nl.backend)

