"""Bridge between the JAX-facing modules and the hand-written kernels.

Everything here takes and returns arrays in the project's pair layout (see
``neighbors``); the kernels themselves live in ``neuralil_fast.kernels``.

Differentiation of the descriptor kernels
-----------------------------------------
``kernel_descriptors`` is a ``jax.custom_vjp`` whose backward is itself a
``custom_vjp`` (``_descriptor_vjp``) in (displacements, A, X_bar):

* first order (forces, stress): the vjp kernel;
* d/dX_bar of the backward (training on forces: grad over parameters of a force
  loss): the jvp kernel, since the backward is linear in X_bar;
* d/d(displacements) of the backward (second derivatives in positions, e.g. a
  Hessian by reverse-over-reverse): the pure-JAX reference, automatically.

The residual A (density coefficients, O(N)) is an output of the forward
primitive that carries no derivative: its dependence on the positions is
accounted for by the reference second-derivative rule above, so no kernel
needs a derivative rule of its own.
Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) through a kernel
backend raises JAX's custom_vjp error; use ``backend="reference"`` or
``jax.jacrev(jax.jacrev(...))`` there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def numba_available() -> bool:
    """True when the numba descriptor kernels import (the FFI itself may still fall back)."""
    try:
        from .kernels.cpu import descriptors  # noqa: F401
    except ImportError:
        return False
    return True


def host_pairs(positions, cell, pbc, r_cut, backend):
    """(i, j, S) numpy pairs from the kernel of ``backend``, centre-sorted."""
    if backend == "numba":
        from .kernels.cpu.neighbors import neighbor_pairs_numba

        return neighbor_pairs_numba(positions, cell, pbc, r_cut)
    if backend == "triton":
        from .kernels.gpu.neighbors import neighbor_pairs_jax

        return neighbor_pairs_jax(positions, cell, pbc, r_cut)
    raise NotImplementedError(f"no host neighbour kernel for backend {backend!r}")


@functools.lru_cache(maxsize=None)
def _numba_pairs_kernel(dtype: str):
    from .kernels.cpu.neighbors_ffi import build_pairs
    from .kernels.ffi import NumbaFFIKernel

    f = np.dtype(dtype).type
    i32 = np.int32
    return NumbaFFIKernel("nf_neighbor_pairs", build_pairs,
                          ((f, 2), (f, 2), (np.bool_, 1), (f, 1)),
                          ((i32, 1), (i32, 1), (i32, 2), (i32, 1)))


def jax_build_pairs(positions, cell, nl):
    """Jittable rebuild of ``nl``'s pairs within r_cut + skin through the kernel of its backend.

    Returns (centers, neighbors, shifts, count, invalid): ``count`` is the true number of
    pairs (it may exceed the capacity: overflow); ``invalid`` flags bad input (NaN
    positions, degenerate cell), for which the host reallocation raises a clear error.
    """
    if nl.backend == "triton":
        from .geometry import _complete_cell
        from .kernels.gpu.neighbors import count_and_fill_jax

        # same basis as the host's binning basis (kernels.cpu.neighbors._basis)
        return count_and_fill_jax(positions, _complete_cell(cell, nl.pbc), nl.pbc,
                                  nl.r_cut + nl.skin, nl.capacity, nl.bin_grid)
    if nl.backend != "numba":
        raise NotImplementedError(f"no jittable neighbour kernel for backend {nl.backend!r}")
    dtype = jnp.dtype(positions.dtype).name
    cap = nl.capacity
    c, j, S, count = _numba_pairs_kernel(dtype)(
        positions, cell.astype(positions.dtype), jnp.asarray(nl.pbc),
        jnp.full((1,), nl.r_cut + nl.skin, positions.dtype),
        out_shapes=[jax.ShapeDtypeStruct((cap,), jnp.int32), jax.ShapeDtypeStruct((cap,), jnp.int32),
                    jax.ShapeDtypeStruct((cap, 3), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)])
    count = count[0]
    return c, j, S, jnp.maximum(count, 0), count < 0


# ---------------------------------------------------------------------------
# Descriptor kernels


@functools.lru_cache(maxsize=None)
def _tables(n_max: int, r_cut: float, n_species: int, dtype: str):
    from .kernels.cpu.descriptors import make_tables

    return make_tables(n_max, r_cut, n_species, np.dtype(dtype))


def _numba_kernels(dtype: str, tables) -> tuple:
    """(fwd, vjp, jvp) NumbaFFIKernel objects for one float dtype and the layout
    (dtypes and ranks) of ``tables``."""
    return _numba_kernels_for(dtype, tuple((t.dtype.type, t.ndim) for t in tables))


@functools.lru_cache(maxsize=None)
def _numba_kernels_for(dtype: str, table_specs: tuple):
    from .kernels.cpu import descriptors as k
    from .kernels.ffi import NumbaFFIKernel

    f = np.dtype(dtype).type
    i32 = np.int32
    ins = ((f, 2), (i32, 1), (i32, 1)) + table_specs
    fwd = NumbaFFIKernel("nf_descriptors_fwd", k.descriptors_fwd, ins, ((f, 2), (f, 3)))
    # the vjp's cotangents and the jvp's tangents (and their results) carry a leading axis
    vjp = NumbaFFIKernel("nf_descriptors_vjp", k.descriptors_vjp, ins + ((f, 3), (f, 3)),
                         ((f, 3),))
    jvp = NumbaFFIKernel("nf_descriptors_jvp", k.descriptors_jvp, ins + ((f, 3), (f, 3)),
                         ((f, 3),))
    return fwd, vjp, jvp


def compile_numba_kernels(dtype) -> None:
    """Compile the numba descriptor kernels (forward, vjp, jvp) of one float dtype, with the
    table layout :func:`_numba_run` passes for n_max <= 13, and their FFI handlers, without
    running them.  Everything lands in numba's and the handler cache, so that processes
    sharing those caches can split the first compilation (minutes; pytest-xdist workers
    do, see tests/conftest.py)."""
    dtype = np.dtype(dtype).name
    tables = _tables(4, 3.0, 1, dtype)
    for kern in _numba_kernels(dtype, tables):
        kern.compile()


@functools.lru_cache(maxsize=None)
def _gpu_tables(n_max: int, r_cut: float):
    from .kernels.gpu.descriptors import build_tables

    return build_tables(n_max, r_cut)


def _triton_run(which: int, spec):
    """The jax-triton launch of kernel ``which``: ``run(d, offsets, species, *extra)``
    (the vjp's and jvp's last input and their output with a leading cotangent axis)."""
    from .kernels.gpu import descriptors as gd

    tables, S = _gpu_tables(spec.n_max, spec.r_cut), spec.n_species
    launch = (gd.descriptors_fwd_jax, gd.descriptors_vjp_jax, gd.descriptors_jvp_jax)[which]

    def run(d, offsets, species, *extra):
        if which == 0:
            return tuple(launch(d, offsets, species, tables=tables, n_species=S))
        # the Triton kernels take one cotangent: one launch each
        *rest, cot = extra
        return (jax.lax.map(lambda c: launch(d, offsets, species, *rest, c, tables=tables,
                                             n_species=S), cot),)

    return run


# cotangents (tangents) per call of the numba vjp (jvp) kernel
COTANGENTS_PER_CALL = 16


def _numba_run(which: int, spec, dtype):
    """The numba FFI call of kernel ``which``: ``run(d, offsets, species, *extra)``."""
    dtype = jnp.dtype(dtype).name
    host_tables = _tables(spec.n_max, spec.r_cut, spec.n_species, dtype)
    if not jax.config.jax_enable_x64:
        # Without x64, JAX cannot carry float64 tables: the Bessel path (float32 above
        # n_max = 13; float64 needs x64 anyway) then runs on float32 tables
        host_tables = tuple(t.astype(np.float32) if t.dtype == np.float64 else t
                            for t in host_tables)
    kern = _numba_kernels(dtype, host_tables)[which]
    n_nlm = sum((spec.n_max - l + 1) * (2 * l + 1) for l in range(spec.n_max + 1))

    def call(d, offsets, species, *extra):
        # the tables become constants of whichever trace runs this (closing over jax
        # arrays made under jit would leak its tracers into lax.map's body)
        tables = [jnp.asarray(t) for t in host_tables]
        n = offsets.shape[0] - 1
        if which == 0:
            outs = [jax.ShapeDtypeStruct((n, spec.n_features), d.dtype),
                    jax.ShapeDtypeStruct((n, spec.n_species, n_nlm), d.dtype)]
        else:
            lead = (extra[-1].shape[0],)
            outs = [jax.ShapeDtypeStruct(lead + (d.shape if which == 1 else
                                                  (n, spec.n_features)), d.dtype)]
        return tuple(kern(d, offsets, species, *tables, *extra, out_shapes=outs))

    def run(d, offsets, species, *extra):
        if which == 0 or extra[-1].shape[0] <= COTANGENTS_PER_CALL:
            return call(d, offsets, species, *extra)
        # many cotangents (e.g. jax.jacrev): calls of COTANGENTS_PER_CALL, which bounds
        # the kernels' per-thread scratch (C x 56 kB for n_max = 4, 4 species)
        *rest, cot = extra
        C, m = cot.shape[0], COTANGENTS_PER_CALL
        padded = jnp.concatenate([cot, jnp.zeros((-C % m,) + cot.shape[1:], cot.dtype)])
        out = jax.lax.map(lambda c: call(d, offsets, species, *rest, c)[0],
                          padded.reshape((-1, m) + cot.shape[1:]))
        return (out.reshape((-1,) + out.shape[2:])[:C],)

    return run


def _call(which: int, spec, backend, d, offsets, species, *extra):
    """Kernel ``which`` (0 forward, 1 vjp, 2 jvp) of ``backend``: a list of its outputs.

    The vjp's X_bar (C, N, F) and the jvp's d_dot (C, P, 3), and their outputs d_bar
    (C, P, 3) and X_dot (C, N, F), carry a leading axis of C cotangents (tangents).
    Under ``jax.vmap`` over configurations both backends make one call for the batch,
    and a vmap over cotangents alone (a committee's members) adds to that axis
    (:func:`_one_call_per_batch`; jax-triton has no batching rule of its own).
    """
    run = _triton_run(which, spec) if backend == "triton" else _numba_run(which, spec, d.dtype)
    # per-pair extras / outputs: the jvp's d_dot, the vjp's d_bar; the rest are per atom;
    # the residual A (extra 0 of the vjp and the jvp) is laid out by the forward that made it
    pair_extra = (False, which == 2)[:len(extra)]
    residual = (which > 0, False)[:len(extra)]
    return list(_one_call_per_batch(run, pair_extra, which == 1, residual, which > 0)(
        d, offsets, species, *extra))


def _one_call_per_batch(run, pair_extra: tuple, pair_out: bool, residual: tuple,
                        cotangents: bool):
    """``run(d, offsets, species, *extra)`` whose ``jax.vmap`` is one kernel call.

    ``cotangents``: the last extra and the outputs carry a leading cotangent axis C.  A
    vmap over that extra alone (the same geometry and residual: a committee's members,
    ``jax.jacrev``) folds into C: one pass over the pairs serves all of them.
    Otherwise, the batch of B configurations (P pair rows, N atoms each) becomes one system of
    B*N atoms: each configuration's pair rows (its centres' runs) moved together, one
    configuration after the other, the padding rows after all of them (outside every
    run: the kernels skip them and give them zero derivative).  Per-atom extras and
    outputs (A, X_bar, X) concatenate; per-pair ones (``pair_extra``: d_dot;
    ``pair_out``: d_bar) go through the same row map.  Nested vmaps flatten in turn.
    Why: in training, a step with eight 225-atom calls in XLA's sequential loop took
    1.10-1.23x as long as with one call (same process, alternating); and left in place, each
    configuration's padding would be r = 0 pairs of its last centre, a lane ~90 pairs
    longer than the others, which made the forward 1.4x slower.
    A ``residual`` extra (A) is laid out by the forward that made it (numba: by work
    items of 64 centres), so a batch of B*N atoms has its own layout: when that forward was not
    batched at this level (e.g. ``jax.jacrev`` vmapping a vjp over cotangents), the
    calls run one per batch element instead (``lax.map``).
    """
    f = jax.custom_batching.custom_vmap(run)

    @f.def_vmap
    def rule(axis_size, in_batched, d, offsets, species, *extra):
        B = axis_size
        if cotangents and in_batched[-1] and not any(in_batched[:-1]):
            c = extra[-1]  # (B, C, ...)
            outs = f(d, offsets, species, *extra[:-1], c.reshape((-1,) + c.shape[2:]))
            return tuple(o.reshape((B, -1) + o.shape[1:]) for o in outs), (True,) * len(outs)
        args = [a if b else jnp.broadcast_to(a, (B,) + a.shape)
                for a, b in zip((d, offsets, species, *extra), in_batched)]
        if not all(b for b, res in zip(in_batched[3:], residual) if res):
            outs = jax.lax.map(lambda a: f(*a), tuple(args))
            return tuple(outs), (True,) * len(outs)
        d, offsets, species, *extra = args
        P, N = d.shape[1], offsets.shape[1] - 1
        itype = offsets.dtype
        start, count = offsets[:, 0], offsets[:, -1] - offsets[:, 0]
        end = jnp.cumsum(count)
        base = end - count  # where configuration b's rows begin in the batch
        # batch row r <- row src[r] of the (B*P) stacked rows; rows past end[-1]: padding
        r = jnp.arange(B * P, dtype=itype)
        b_of_r = jnp.minimum(jnp.searchsorted(end, r, side="right"), B - 1).astype(itype)
        src = b_of_r * P + start[b_of_r] + r - base[b_of_r]
        real = r < end[-1]
        src = jnp.where(real, src, 0)

        def rows_in(a):
            a = a.reshape((B * P,) + a.shape[2:])[src]
            keep = real.reshape((-1,) + (1,) * (a.ndim - 1))
            return jnp.where(keep, a, jnp.zeros((), a.dtype))

        def rows_out(o):
            # batch row of configuration b's row k; rows outside its runs get zero
            k = jnp.arange(P, dtype=itype)
            inside = (k >= start[:, None]) & (k < start[:, None] + count[:, None])
            dst = jnp.where(inside, base[:, None] + k - start[:, None], 0)
            return jnp.where(inside.reshape(inside.shape + (1,) * (o.ndim - 1)), o[dst],
                             jnp.zeros((), o.dtype))

        def atoms_in(a):
            return a.reshape((B * a.shape[1],) + a.shape[2:])

        def extra_in(a, per_pair, cot):
            fn = rows_in if per_pair else atoms_in
            # cotangents (B, C, ...): each of the C mapped, C leading
            return jax.vmap(fn, in_axes=1)(a) if cot else fn(a)

        moved = offsets[:, :N] - start[:, None] + base[:, None]
        offsets = jnp.concatenate([moved.reshape(B * N), end[-1:]])
        last = len(extra) - 1
        extra = [extra_in(a, per_pair, cotangents and i == last)
                 for i, (a, per_pair) in enumerate(zip(extra, pair_extra))]
        outs = f(rows_in(d), offsets, rows_in(species), *extra)
        if pair_out:
            outs = tuple(jnp.moveaxis(jax.vmap(rows_out)(o), 0, 1) if cotangents else rows_out(o)
                         for o in outs)
        elif cotangents:
            outs = tuple(jnp.moveaxis(o.reshape((o.shape[0], B, N) + o.shape[2:]), 0, 1)
                         for o in outs)
        else:
            outs = tuple(o.reshape((B, N) + o.shape[1:]) for o in outs)
        return outs, (True,) * len(outs)

    return f


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _forward(spec, n_atoms, backend, d, centers, offsets, species):
    """(X (N, F), A (N, S, n_nlm)); A carries no derivative of its own (see module doc)."""
    return tuple(_call(0, spec, backend, d, offsets, species))


def _forward_fwd(spec, n_atoms, backend, d, centers, offsets, species):
    # Re-binding the primitive (not calling the kernel) keeps X differentiable
    # when an outer derivative (reverse-over-reverse) traces this rule.
    X, A = _forward(spec, n_atoms, backend, d, centers, offsets, species)
    return (X, A), (d, centers, offsets, species, A)


def _forward_bwd(spec, n_atoms, backend, res, cotangents):
    d, centers, offsets, species, A = res
    X_bar, _ = cotangents
    d_bar = _descriptor_vjp(spec, n_atoms, backend, d, centers, offsets, species, A, X_bar)
    return d_bar, None, None, None


_forward.defvjp(_forward_fwd, _forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _descriptor_vjp(spec, n_atoms, backend, d, centers, offsets, species, A, X_bar):
    return _call(1, spec, backend, d, offsets, species, A, X_bar.astype(d.dtype)[None])[0][0]


def _descriptor_vjp_fwd(spec, n_atoms, backend, d, centers, offsets, species, A, X_bar):
    d_bar = _descriptor_vjp(spec, n_atoms, backend, d, centers, offsets, species, A, X_bar)
    return d_bar, (d, centers, offsets, species, A, X_bar)


def _descriptor_vjp_bwd(spec, n_atoms, backend, res, d_bar_bar):
    d, centers, offsets, species, A, X_bar = res
    # The backward is linear in X_bar: its transpose is the descriptor JVP (kernel).
    X_bar_bar = _call(2, spec, backend, jax.lax.stop_gradient(d), offsets, species,
                      A, d_bar_bar.astype(d.dtype)[None])[0][0]
    # Second derivative in the displacements: the reference (pruned by XLA when unused).
    from .descriptors import descriptors_reference

    def first_order(dd):
        return jax.vjp(lambda x: descriptors_reference(spec, x, centers, species, n_atoms),
                       dd)[1](X_bar)[0]

    d_cot = jax.vjp(first_order, d)[1](d_bar_bar)[0]
    return d_cot, None, None, None, None, X_bar_bar


_descriptor_vjp.defvjp(_descriptor_vjp_fwd, _descriptor_vjp_bwd)


def kernel_descriptors(spec, displacements, centers, neighbor_species, n_atoms, backend):
    """Descriptors (n_atoms, n_features) through the kernels of ``backend``, differentiable."""
    if backend not in ("numba", "triton"):
        raise NotImplementedError(f"no descriptor kernel for backend {backend!r}")
    centers = centers.astype(jnp.int32)
    offsets = jnp.searchsorted(centers, jnp.arange(n_atoms + 1, dtype=jnp.int32),
                               side="left").astype(jnp.int32)
    return _forward(spec, n_atoms, backend, displacements, centers, offsets,
                    neighbor_species.astype(jnp.int32))[0]
