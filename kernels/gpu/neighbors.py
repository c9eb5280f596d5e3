"""Cell-list neighbour search in Triton (same output convention as the numba one).

Convention: ``ase.neighborlist.neighbor_list("ijS", atoms, r_cut)`` with
``self_interaction=False`` -- every ordered pair (i, j, S) with
``|x_j + S @ cell - x_i| < r_cut`` over all periodic images except the self pair
(i == j, S == 0); distance-0 pairs of different atoms are kept, as in ASE.  Cell
rows are lattice vectors, ``pbc`` is per direction (S = 0 along open directions,
whose cell rows are ignored), positions are not wrapped.  Output is in CSR
order (sorted by centre), see ``kernels/cpu/neighbors.py`` for why.

Layout of the work:

* host (torch ops on any device, or jnp): the binning basis (periodic rows = lattice
  vectors, open rows = orthonormal complement; ``kernels.cpu.neighbors._basis``),
  fractional coordinates, integer wrap shifts, bins of perpendicular width
  >= r_cut, a stable sort of the atoms by bin and the bin start table;
* ``_nl_body`` (one program per centre, in bin order) loops over the
  (2m+1)^3 neighbouring bins (with their image shifts) in blocks of ``BLOCK``
  atoms.  Run twice: ``_nl_count_kernel`` counts the pairs of each centre, a
  prefix sum gives the CSR offsets, ``_nl_fill_kernel`` writes each centre's
  run (in-block compaction with ``tl.cumsum``).  No atomics, deterministic.

Differences from the numba version: distances are tested in float64 (in the
positions' dtype in the jitted build) on the
wrapped coordinates only (no re-evaluation of near-ties with ASE's formula), so
a pair whose distance is within ~1e-15 relative of r_cut may be decided
differently from ASE.

Two hosts for the same kernels (``_nl_count_kernel``, ``_nl_fill_kernel``):

* torch tensors (CPU tensors run in the Triton interpreter when
  ``TRITON_INTERPRET=1``): ``count_and_fill_triton(positions, cell, pbc, r_cut,
  capacity, centers_out, neighbors_out, shifts_out) -> n_pairs`` (true count; at
  most ``capacity`` pairs written; padding centre = neighbour = N, shift 0) and
  ``neighbor_pairs_triton(positions, cell, pbc, r_cut) -> (i, j, S)`` int32;
* jax arrays through ``jax_triton.triton_call`` (the ``triton`` backend):
  ``count_and_fill_jax`` is jittable -- the binning plan is jnp on a static bin
  grid (``bin_grid``, chosen on the host with a margin) and the build flags itself
  when the cell or the atoms' open extent has shrunk out of that grid -- and
  ``neighbor_pairs_jax`` is the host entry (float64, numpy in and out).
"""
from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

from ..cpu.neighbors import (
    _BIN_SAFETY,
    _ERR_MESSAGES,
    _MAX_IMAGES,
    ERR_NONFINITE,
    ERR_RCUT,
    ERR_TOO_MANY_IMAGES,
    _basis,
)

__all__ = ["bin_grid", "count_and_fill_jax", "count_and_fill_triton", "neighbor_pairs_jax",
           "neighbor_pairs_triton"]


@triton.jit
def _image(z, n, K, per):
    """Bin coordinate z (may leave [0, n)) -> (image shift, bin, valid)."""
    zz = z + K * n  # >= 0 by construction of K: no negative // or %
    q_per = zz // n - K
    r_per = zz % n
    r_open = tl.minimum(tl.maximum(z, 0), n - 1)
    valid_open = (z >= 0) & (z < n)
    q = tl.where(per != 0, q_per, 0)
    r = tl.where(per != 0, r_per, r_open)
    valid = (per != 0) | valid_open
    return q, r, valid


@triton.jit
def _nl_body(xs_ptr, ks_ptr, perm_ptr, binof_ptr, cstart_ptr, off_ptr, geom_ptr,
             nx, ny, nz, mx, my, mz, kx, ky, kz, perx, pery, perz, capacity,
             cnt_ptr, ci_ptr, cj_ptr, cs_ptr,
             FILL: tl.constexpr, BLOCK: tl.constexpr):
    # binning basis M (row-major) and r_cut^2 come as a float64 buffer:
    # Python float kernel arguments would be passed as fp32
    m00 = tl.load(geom_ptr + 0)
    m01 = tl.load(geom_ptr + 1)
    m02 = tl.load(geom_ptr + 2)
    m10 = tl.load(geom_ptr + 3)
    m11 = tl.load(geom_ptr + 4)
    m12 = tl.load(geom_ptr + 5)
    m20 = tl.load(geom_ptr + 6)
    m21 = tl.load(geom_ptr + 7)
    m22 = tl.load(geom_ptr + 8)
    rc2 = tl.load(geom_ptr + 9)
    t = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    b = tl.load(binof_ptr + t)
    bx = b % nx
    rr = b // nx
    by = rr % ny
    bz = rr // ny
    cx = tl.load(xs_ptr + 3 * t + 0)
    cy = tl.load(xs_ptr + 3 * t + 1)
    cz = tl.load(xs_ptr + 3 * t + 2)
    kt0 = tl.load(ks_ptr + 3 * t + 0)
    kt1 = tl.load(ks_ptr + 3 * t + 1)
    kt2 = tl.load(ks_ptr + 3 * t + 2)
    i = tl.load(perm_ptr + t)
    zero_i32 = tl.zeros((BLOCK,), dtype=tl.int32)
    p = tl.sum(zero_i32, 0).to(tl.int64)
    if FILL:
        p += tl.load(off_ptr + i).to(tl.int64)
    for dz in range(-mz, mz + 1):
        qz, rz, vz = _image(bz + dz, nz, kz, perz)
        for dy in range(-my, my + 1):
            qy, ry, vy = _image(by + dy, ny, ky, pery)
            for dx in range(-mx, mx + 1):
                qx, rx, vx = _image(bx + dx, nx, kx, perx)
                rb = rx + nx * (ry + ny * rz)
                a0 = tl.load(cstart_ptr + rb)
                a1 = tl.load(cstart_ptr + rb + 1)
                a1 = tl.where(vx & vy & vz, a1, a0)
                qxf = qx.to(tl.float64)
                qyf = qy.to(tl.float64)
                qzf = qz.to(tl.float64)
                px = cx - (qxf * m00 + qyf * m10 + qzf * m20)
                py = cy - (qxf * m01 + qyf * m11 + qzf * m21)
                pz = cz - (qxf * m02 + qyf * m12 + qzf * m22)
                # 1 where this bin image has shift 0 (then u == t is the
                # self pair); kept as an int vector so that every mask below
                # is a plain vector comparison
                zs = ((qx == 0) & (qy == 0) & (qz == 0)).to(tl.int32)
                zs_vec = zero_i32 + zs
                for a in range(a0, a1, BLOCK):
                    u = a + lanes
                    m = u < a1
                    dxv = tl.load(xs_ptr + 3 * u + 0, mask=m, other=0.0) - px
                    dyv = tl.load(xs_ptr + 3 * u + 1, mask=m, other=0.0) - py
                    dzv = tl.load(xs_ptr + 3 * u + 2, mask=m, other=0.0) - pz
                    d2 = dxv * dxv + dyv * dyv + dzv * dzv
                    acc = m & (d2 < rc2) & ((u != t) | (zs_vec == 0))
                    acc_i = acc.to(tl.int32)
                    if FILL:
                        dst = p + (tl.cumsum(acc_i, 0) - 1).to(tl.int64)
                        w = acc & (dst < capacity)
                        j = tl.load(perm_ptr + u, mask=m, other=0)
                        k0 = tl.load(ks_ptr + 3 * u + 0, mask=m, other=0)
                        k1 = tl.load(ks_ptr + 3 * u + 1, mask=m, other=0)
                        k2 = tl.load(ks_ptr + 3 * u + 2, mask=m, other=0)
                        tl.store(ci_ptr + dst, zero_i32 + i, mask=w)
                        tl.store(cj_ptr + dst, j, mask=w)
                        tl.store(cs_ptr + 3 * dst + 0, qx + kt0 - k0, mask=w)
                        tl.store(cs_ptr + 3 * dst + 1, qy + kt1 - k1, mask=w)
                        tl.store(cs_ptr + 3 * dst + 2, qz + kt2 - k2, mask=w)
                    p += tl.sum(acc_i, 0).to(tl.int64)
    if not FILL:
        tl.store(cnt_ptr + i, p.to(cnt_ptr.dtype.element_ty))


# Two entry points over one body, outputs last: jax-triton appends the output
# buffers after the inputs, and the count pass has one output, the fill pass three.
@triton.jit
def _nl_count_kernel(xs_ptr, ks_ptr, perm_ptr, binof_ptr, cstart_ptr, geom_ptr,
                     nx, ny, nz, mx, my, mz, kx, ky, kz, perx, pery, perz,
                     cnt_ptr, BLOCK: tl.constexpr):
    _nl_body(xs_ptr, ks_ptr, perm_ptr, binof_ptr, cstart_ptr, cnt_ptr, geom_ptr,
             nx, ny, nz, mx, my, mz, kx, ky, kz, perx, pery, perz, 0,
             cnt_ptr, cnt_ptr, cnt_ptr, cnt_ptr, False, BLOCK)


@triton.jit
def _nl_fill_kernel(xs_ptr, ks_ptr, perm_ptr, binof_ptr, cstart_ptr, off_ptr, geom_ptr,
                    nx, ny, nz, mx, my, mz, kx, ky, kz, perx, pery, perz, capacity,
                    ci_ptr, cj_ptr, cs_ptr, BLOCK: tl.constexpr):
    _nl_body(xs_ptr, ks_ptr, perm_ptr, binof_ptr, cstart_ptr, off_ptr, geom_ptr,
             nx, ny, nz, mx, my, mz, kx, ky, kz, perx, pery, perz, capacity,
             ci_ptr, ci_ptr, cj_ptr, cs_ptr, True, BLOCK)


def _check_args(shape, cell, pbc, r_cut):
    """(r_cut float, cell (3, 3) float64, pbc (3,) bool) or ValueError naming the problem."""
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {tuple(shape)}")
    try:
        r_cut = float(r_cut)
    except (TypeError, ValueError):
        raise ValueError(f"r_cut must be a number, got {r_cut!r}") from None
    if not (math.isfinite(r_cut) and r_cut > 0):
        raise ValueError(_ERR_MESSAGES[ERR_RCUT] + f" (got {r_cut!r})")
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    return r_cut, cell, np.broadcast_to(np.asarray(pbc, bool), (3,)).copy()


def _check(positions, cell, pbc, r_cut):
    import torch

    if not isinstance(positions, torch.Tensor):
        raise ValueError("positions must be a torch tensor")
    if isinstance(cell, torch.Tensor):
        cell = cell.detach().cpu().numpy()
    r_cut, cell, pbc = _check_args(tuple(positions.shape), cell, pbc, r_cut)
    if positions.numel() and not bool(torch.isfinite(positions).all()):
        raise ValueError(_ERR_MESSAGES[ERR_NONFINITE])
    code, M, B, cell_eff = _basis(np.ascontiguousarray(cell), pbc)
    if code != 0:
        raise ValueError(_ERR_MESSAGES[code] + f" (pbc={pbc.tolist()})")
    return r_cut, cell, pbc, M, B


def _grid(h, pbc, rr, n):
    """Static bin grid ``(nb, ms, kk)`` (three 3-tuples of ints) for widths ``h`` (Å).

    ``h``: perpendicular cell widths along periodic directions, the atoms' extent
    along open ones.  ``nb`` bins per direction (each at least ``rr`` wide, at most
    ~4 bins per atom in all), ``ms`` bins searched each way, ``kk`` the offset that
    keeps the kernel's integer division non-negative.
    """
    nb, ms, kk = [1, 1, 1], [0, 0, 0], [0, 0, 0]
    for c in range(3):
        if pbc[c] and rr / h[c] > _MAX_IMAGES:
            raise ValueError(_ERR_MESSAGES[ERR_TOO_MANY_IMAGES])
        nb[c] = int(min(max(math.floor(h[c] / rr), 1), 1 << 20))
    while nb[0] * nb[1] * nb[2] > 4 * n + 64:
        c = int(np.argmax(nb))
        nb[c] = max(1, nb[c] // 2)
    for c in range(3):
        if not pbc[c] and nb[c] == 1:
            ms[c] = 0
        else:
            ms[c] = int(math.ceil(rr * nb[c] / h[c]))
            if not pbc[c]:
                ms[c] = min(ms[c], nb[c] - 1)
        kk[c] = ms[c] // nb[c] + 1
    return tuple(nb), tuple(ms), tuple(kk)


def _plan(positions, pbc, r_cut, M, B):
    """Bins, sorted wrapped coordinates and shifts (torch, on positions' device)."""
    import torch

    dev = positions.device
    n = positions.shape[0]
    rr = r_cut * _BIN_SAFETY
    pos = positions.to(torch.float64)
    Mt = torch.as_tensor(M, dtype=torch.float64, device=dev)
    Bt = torch.as_tensor(B, dtype=torch.float64, device=dev)
    frac = pos @ Bt.T
    perv = torch.as_tensor(pbc, device=dev)
    k = torch.where(perv, torch.floor(frac), torch.zeros_like(frac))
    f = frac - k
    fmin, h = [0.0] * 3, [0.0] * 3
    for c in range(3):
        if pbc[c]:
            h[c] = 1.0 / float(np.linalg.norm(B[c]))
        else:
            lo_c, hi_c = float(f[:, c].min()), float(f[:, c].max())
            fmin[c], h[c] = lo_c, hi_c - lo_c
    nb, ms, kk = _grid(h, pbc, rr, n)
    scale = [nb[c] if pbc[c] else (nb[c] / h[c] if h[c] > 0 else 0.0) for c in range(3)]
    bins = torch.zeros(n, dtype=torch.int64, device=dev)
    for c in (2, 1, 0):
        v = torch.floor((f[:, c] - fmin[c]) * scale[c]).to(torch.int64)
        bins = bins * nb[c] + v.clamp(0, nb[c] - 1)
    bins_sorted, perm = torch.sort(bins, stable=True)
    nbins = nb[0] * nb[1] * nb[2]
    cstart = torch.zeros(nbins + 1, dtype=torch.int64, device=dev)
    cstart[1:] = torch.cumsum(torch.bincount(bins, minlength=nbins), 0)
    wrapped = pos - k @ Mt
    xs = wrapped[perm].contiguous()
    ks = k[perm].to(torch.int32).contiguous()
    return dict(
        xs=xs, ks=ks, perm=perm.to(torch.int32), binof=bins_sorted.to(torch.int32),
        cstart=cstart.to(torch.int32), nb=nb, ms=ms, kk=kk, M=M,
    )


def _scalars(grid, pbc):
    nb, ms, kk = grid
    return (*nb, *ms, *kk, *[int(bool(p)) for p in pbc])


def _launch(plan, n, r_cut, pbc, fill, offsets, counts, ci, cj, cs, capacity,
            block, num_warps):
    import torch

    geom = torch.tensor(list(np.asarray(plan["M"], np.float64).ravel())
                        + [float(r_cut) ** 2], dtype=torch.float64,
                        device=plan["xs"].device)
    ins = (plan["xs"], plan["ks"], plan["perm"], plan["binof"], plan["cstart"])
    scal = _scalars((plan["nb"], plan["ms"], plan["kk"]), pbc)
    if fill:
        _nl_fill_kernel[(n,)](*ins, offsets, geom, *scal, int(capacity), ci, cj, cs,
                              BLOCK=block, num_warps=num_warps)
    else:
        _nl_count_kernel[(n,)](*ins, geom, *scal, counts, BLOCK=block, num_warps=num_warps)


def _count(positions, cell, pbc, r_cut, block, num_warps):
    import torch

    r_cut, cell, pbc, M, B = _check(positions, cell, pbc, r_cut)
    n = positions.shape[0]
    dev = positions.device
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    if n == 0:
        return None, offsets, pbc, r_cut
    plan = _plan(positions, pbc, r_cut, M, B)
    counts = torch.zeros(n, dtype=torch.int64, device=dev)
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    _launch(plan, n, r_cut, pbc, False, offsets, counts, dummy, dummy, dummy, 0,
            block, num_warps)
    offsets[1:] = torch.cumsum(counts, 0)
    return plan, offsets, pbc, r_cut


def count_and_fill_triton(positions, cell, pbc, r_cut, capacity, centers_out,
                          neighbors_out, shifts_out, *, block=32, num_warps=1):
    """Same contract as ``kernels.cpu.neighbors.count_and_fill`` (torch tensors).

    Returns the true number of pairs; writes at most ``capacity`` of them in
    CSR order; entries ``[n_pairs, capacity)`` get centre = neighbour = N and
    shift 0.  Invalid input raises ValueError.
    """
    n = positions.shape[0]
    plan, offsets, pbc, r_cut = _count(positions, cell, pbc, r_cut, block, num_warps)
    total = int(offsets[-1])
    cap = min(int(capacity), centers_out.shape[0], neighbors_out.shape[0],
              shifts_out.shape[0])
    if n and cap > 0 and total > 0:
        _launch(plan, n, r_cut, pbc, True, offsets, offsets, centers_out,
                neighbors_out, shifts_out, cap, block, num_warps)
    if total < cap:
        centers_out[total:cap] = n
        neighbors_out[total:cap] = n
        shifts_out[total:cap] = 0
    return total


def neighbor_pairs_triton(positions, cell, pbc, r_cut, *, block=32, num_warps=1):
    """(i, j, S) int32 torch tensors on ``positions.device``, CSR order."""
    import torch

    n = positions.shape[0]
    plan, offsets, pbc, r_cut = _count(positions, cell, pbc, r_cut, block, num_warps)
    total = int(offsets[-1])
    dev = positions.device
    ci = torch.empty(total, dtype=torch.int32, device=dev)
    cj = torch.empty(total, dtype=torch.int32, device=dev)
    cs = torch.empty((total, 3), dtype=torch.int32, device=dev)
    if total:
        _launch(plan, n, r_cut, pbc, True, offsets, offsets, ci, cj, cs, total,
                block, num_warps)
    return ci, cj, cs


# --------------------------------------------------------------------------- jax

def bin_grid(positions, cell, pbc, r_cut, *, margin: float = 1.0):
    """Host: the static bin grid of :func:`count_and_fill_jax` for these positions.

    ``margin`` > 1 makes the bins that much wider than ``r_cut``, so that a jitted
    rebuild stays valid while the cell or the atoms' extent along open directions
    shrinks by up to that factor (beyond it the build flags itself invalid).
    """
    return _grid_and_basis(positions, cell, pbc, r_cut, margin)[0]


def _grid_and_basis(positions, cell, pbc, r_cut, margin):
    """(bin grid, binning basis M (3, 3)) on the host; ValueError for a bad cell."""
    positions = np.asarray(positions, np.float64)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,)).copy()
    code, M, B, _ = _basis(np.ascontiguousarray(cell), pbc)
    if code != 0:
        raise ValueError(_ERR_MESSAGES[code] + f" (pbc={pbc.tolist()})")
    f = positions @ B.T
    h = [1.0 / float(np.linalg.norm(B[c])) if pbc[c]
         else (float(np.ptp(f[:, c])) if len(f) else 0.0) for c in range(3)]
    return _grid(h, pbc, float(r_cut) * _BIN_SAFETY * margin, len(positions)), M


def _plan_jax(positions, basis, pbc, rr, grid):
    """jnp version of ``_plan`` on a static grid; also says whether the grid still fits.

    ``basis``: (3, 3) rows = periodic lattice vectors, open rows an orthonormal
    complement (``geometry._complete_cell``); traced.
    """
    import jax.numpy as jnp

    nb, ms, _ = grid
    B = jnp.linalg.inv(basis).T  # rows: reciprocal vectors, frac_c = x . B[c]
    per = jnp.asarray(pbc)
    frac = positions @ B.T
    k = jnp.where(per, jnp.floor(frac), 0.0)
    f = frac - k
    fmin = jnp.where(per, 0.0, jnp.min(f, axis=0))
    h = jnp.where(per, 1.0 / jnp.linalg.norm(B, axis=1), jnp.max(f, axis=0) - fmin)
    nbv = jnp.asarray(nb, f.dtype)
    scale = jnp.where(per, nbv, jnp.where(h > 0, nbv / jnp.where(h > 0, h, 1.0), 0.0))
    v = jnp.floor((f - fmin) * scale)
    v = jnp.clip(jnp.nan_to_num(v), 0, nbv - 1).astype(jnp.int32)
    bins = v[:, 0] + nb[0] * (v[:, 1] + nb[1] * v[:, 2])
    perm = jnp.argsort(bins, stable=True).astype(jnp.int32)
    binof = bins[perm]
    cstart = jnp.searchsorted(binof, jnp.arange(nb[0] * nb[1] * nb[2] + 1, dtype=jnp.int32),
                              side="left").astype(jnp.int32)
    xs = (positions - k @ basis)[perm]
    ks = k[perm].astype(jnp.int32)
    # ms bins of width h / nb must span rr; an open direction searched over all
    # its bins always does.
    spans = jnp.asarray(ms, f.dtype) * h >= rr * nbv
    whole = (~per) & (jnp.asarray(ms) >= jnp.asarray(nb) - 1)
    ok = jnp.all(spans | whole) & jnp.all(jnp.isfinite(positions)) & jnp.all(jnp.isfinite(B))
    return xs, ks, perm, binof, cstart, ok


def count_and_fill_jax(positions, basis, pbc, r_cut, capacity: int, grid, *,
                       block: int = 32, num_warps: int = 1):
    """Jittable pairs through jax_triton: (centers, neighbors, shifts, count, invalid).

    positions (N, 3) and basis (3, 3) are traced; ``pbc`` (3 bools), ``r_cut``,
    ``capacity`` and ``grid`` (:func:`bin_grid`) are static.  ``count`` is the
    true number of pairs (it may exceed ``capacity``: only the first ``capacity``
    are written, the caller sees the overflow); rows from ``count`` on are padding
    (centre = neighbour = N, shift 0).  ``invalid``: NaN positions, a singular
    basis, or a grid the cell has shrunk out of: rebuild on the host.
    Distances are tested in the positions' dtype.
    """
    import jax.numpy as jnp

    if positions.shape[0] == 0:
        cap = int(capacity)
        return (jnp.zeros(cap, jnp.int32), jnp.zeros(cap, jnp.int32),
                jnp.zeros((cap, 3), jnp.int32), jnp.asarray(0, jnp.int32), jnp.asarray(False))
    launch, offsets, ok = _count_jax(positions, basis, pbc, r_cut, grid, block, num_warps)
    return (*_fill_jax(launch, offsets, positions.shape[0], int(capacity)), offsets[-1], ~ok)


def _count_jax(positions, basis, pbc, r_cut, grid, block, num_warps):
    """Plan and count pass (N >= 1): (fill-pass launch data, offsets (N + 1,), ok)."""
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    n = positions.shape[0]
    pbc = tuple(bool(p) for p in pbc)
    i32 = jnp.int32
    xs, ks, perm, binof, cstart, ok = _plan_jax(positions, basis.astype(positions.dtype),
                                                pbc, float(r_cut) * _BIN_SAFETY, grid)
    geom = jnp.concatenate([basis.astype(xs.dtype).ravel(),
                            jnp.full((1,), float(r_cut) ** 2, xs.dtype)])
    scal = _scalars(grid, pbc)
    ins = (xs, ks, perm, binof, cstart)
    counts = jt.triton_call(*ins, geom, *scal, kernel=_nl_count_kernel,
                            out_shape=jax.ShapeDtypeStruct((n,), i32), grid=(n,),
                            num_warps=num_warps, BLOCK=block)
    offsets = jnp.concatenate([jnp.zeros(1, i32), jnp.cumsum(counts, dtype=i32)])
    return (ins, geom, scal, block, num_warps), offsets, ok


def _fill_jax(launch, offsets, n, cap):
    """Fill pass into ``cap`` rows: (centers, neighbors, shifts), padding from the count."""
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    i32 = jnp.int32
    if cap == 0:
        return jnp.zeros(0, i32), jnp.zeros(0, i32), jnp.zeros((0, 3), i32)
    ins, geom, scal, block, num_warps = launch
    ci, cj, cs = jt.triton_call(
        *ins, offsets, geom, *scal, cap, kernel=_nl_fill_kernel,
        out_shape=(jax.ShapeDtypeStruct((cap,), i32), jax.ShapeDtypeStruct((cap,), i32),
                   jax.ShapeDtypeStruct((cap, 3), i32)),
        grid=(n,), num_warps=num_warps, BLOCK=block)
    # rows past the count are never written (outputs start uninitialised)
    valid = jnp.arange(cap, dtype=i32) < offsets[-1]
    return (jnp.where(valid, ci, n), jnp.where(valid, cj, n),
            jnp.where(valid[:, None], cs, 0))


def neighbor_pairs_jax(positions, cell, pbc, r_cut, *, block: int = 32, num_warps: int = 1):
    """Host: (i, j, S) numpy int32, CSR order, through the jax_triton kernels in float64.

    Same contract and errors as :func:`neighbor_pairs_triton` (numpy inputs).
    """
    import jax
    import jax.numpy as jnp

    positions = np.asarray(positions, np.float64)
    r_cut, cell, pbc = _check_args(positions.shape, cell, pbc, r_cut)
    if not np.all(np.isfinite(positions)):
        raise ValueError(_ERR_MESSAGES[ERR_NONFINITE])
    pbc = tuple(bool(p) for p in pbc)
    # raises on a bad cell; the margin only absorbs rounding between host and jnp widths
    grid, M = _grid_and_basis(positions, cell, pbc, r_cut, 1.0 + 1e-6)
    if len(positions) == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros((0, 3), np.int32)
    with jax.enable_x64(True):  # exact float64 decisions, as the other backends
        launch, offsets, ok = _count_jax(jnp.asarray(positions), jnp.asarray(M), pbc, r_cut,
                                         grid, block, num_warps)
        if not bool(ok):  # inputs were checked above: this is a bug, not bad input
            raise RuntimeError("the Triton neighbour build rejected its own bin grid")
        # one count pass: the exact size is known before the fill
        ci, cj, cs = _fill_jax(launch, offsets, len(positions), int(offsets[-1]))
        return np.asarray(ci), np.asarray(cj), np.asarray(cs)
