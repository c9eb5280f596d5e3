"""The descriptor kernels as JAX primitives, against the pure-JAX reference on the same inputs.

Covers: values, forces and stress through the model; the force-loss gradient
with respect to the parameters (double backward through the kernels); jit,
grad, vmap over configurations; the Hessian route (reverse-over-reverse falls
back to the reference for second derivatives in positions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralil_fast.descriptors import DescriptorSpec, descriptors
from neuralil_fast.kernels_api import numba_available
from neuralil_fast.model import NeuralIL
from neuralil_fast.neighbors import neighbor_pairs_reference, pair_displacements
from neuralil_fast.potential import evaluate

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba kernels not importable")

TOL = {"float64": 1e-10, "float32": 1e-5}


def _random_system(seed, n_atoms, n_species, box=7.0, triclinic=True):
    rng = np.random.default_rng(seed)
    cell = np.diag([box, box * 1.1, box * 0.95])
    if triclinic:
        cell = cell + rng.uniform(-0.25, 0.25, (3, 3)) * box
    frac = rng.random((n_atoms, 3))
    positions = frac @ cell + rng.normal(0, 0.05, (n_atoms, 3))
    positions[-1] = positions[0] + np.array([1e-3, 0.0, 0.0])  # a very short pair
    species = rng.integers(0, n_species, n_atoms)
    return positions, cell, species


def _pairs(positions, cell, r_cut, species):
    i, j, S = neighbor_pairs_reference(positions, cell, np.ones(3, bool), r_cut)
    return (jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32), jnp.asarray(S, jnp.int32),
            jnp.asarray(species[j], jnp.int32))


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-300)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31), n_atoms=st.integers(2, 14), n_species=st.integers(1, 4),
       n_max=st.integers(0, 5), r_cut=st.floats(2.0, 4.5))
def test_descriptors_and_vjp_match_reference(dtype, seed, n_atoms, n_species, n_max, r_cut):
    positions, cell, species = _random_system(seed, n_atoms, n_species)
    c, j, S, sp = _pairs(positions, cell, r_cut, species)
    spec = DescriptorSpec(n_species, r_cut, n_max)
    W = np.random.default_rng(seed).normal(size=(n_atoms, spec.n_features))
    # Both paths see the same (dtype-rounded) inputs: the comparison is of the kernels,
    # not of float32 input rounding (which dominates for the 1e-3 Å pair).
    positions = positions.astype(dtype).astype(np.float64)
    cell = cell.astype(dtype).astype(np.float64)
    with jax.enable_x64(True):
        ref = {}
        for backend, dt in (("reference", jnp.float64), ("numba", jnp.dtype(dtype))):
            def f(pos, cel):
                d = pair_displacements(pos, cel, c, j, S)
                X = descriptors(spec, d, c, sp, n_atoms, backend=backend)
                return jnp.sum(jnp.sin(X * jnp.asarray(W, X.dtype))), X
            (val, X), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
                jnp.asarray(positions, dt), jnp.asarray(cell, dt))
            ref[backend] = (X, grads)
        tol = TOL[dtype]
        _close(ref["numba"][0], ref["reference"][0], tol)
        _close(ref["numba"][1][0], ref["reference"][1][0], tol * 10)
        _close(ref["numba"][1][1], ref["reference"][1][1], tol * 10)


def test_float32_results_do_not_depend_on_x64():
    """float32 descriptors, their vjp and the double backward (jvp kernel) are the same
    bits with and without jax_enable_x64: one table layout, one compiled variant."""
    n_atoms, n_species, r_cut = 9, 3, 3.7  # r_cut^2 not a float32 number
    positions, cell, species = _random_system(5, n_atoms, n_species)
    spec = DescriptorSpec(n_species, r_cut, 4)
    W = np.random.default_rng(5).normal(size=(n_atoms, spec.n_features)).astype(np.float32)

    def run():
        c, j, S, sp = _pairs(positions, cell, r_cut, species)
        box = jnp.asarray(cell, jnp.float32)

        def f(pos, w):
            X = descriptors(spec, pair_displacements(pos, box, c, j, S), c, sp, n_atoms,
                            backend="numba")
            return jnp.sum(jnp.sin(X * w)), X

        def force_loss(w, pos):  # its gradient in w runs the jvp kernel
            return jnp.sum(jax.grad(lambda p: f(p, w)[0])(pos) ** 2)

        x, w = jnp.asarray(positions, jnp.float32), jnp.asarray(W)
        (_, X), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(x, w)
        w_bar = jax.jit(jax.grad(force_loss))(w, x)
        return [np.asarray(a) for a in (X, grad, w_bar)]

    off = run()
    with jax.enable_x64(True):
        on = run()
    for a, b in zip(off, on):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compile_numba_kernels_builds_what_the_descriptors_call(monkeypatch, dtype):
    """The warm-up (``compile_numba_kernels``, which the test workers split) compiles the
    very kernels that forces and a force loss's parameter gradient call: same targets."""
    from neuralil_fast import kernels_api
    from neuralil_fast.kernels.ffi import NumbaFFIKernel

    compiled, called = set(), set()
    compile_, call = NumbaFFIKernel.compile, NumbaFFIKernel.__call__
    monkeypatch.setattr(NumbaFFIKernel, "compile",
                        lambda self: (compiled.add(self.target_name), compile_(self))[1])
    monkeypatch.setattr(NumbaFFIKernel, "__call__", lambda self, *a, **k: (
        called.add(self.target_name), call(self, *a, **k))[1])
    kernels_api.compile_numba_kernels(dtype)
    n_atoms, n_species, r_cut = 7, 2, 3.3
    positions, cell, species = _random_system(2, n_atoms, n_species)
    spec = DescriptorSpec(n_species, r_cut, 6)
    with jax.enable_x64(dtype == "float64"):
        c, j, S, sp = _pairs(positions, cell, r_cut, species)

        def energy(pos, w):
            d = pair_displacements(pos, jnp.asarray(cell, dtype), c, j, S)
            return jnp.sum(jnp.tanh(descriptors(spec, d, c, sp, n_atoms, backend="numba") * w))

        jax.jit(jax.grad(lambda w, x: jnp.sum(jax.grad(energy)(x, w) ** 2)))(
            jnp.asarray(0.3, dtype), jnp.asarray(positions, dtype))
    assert len(compiled) == 3 and called == compiled


def _ean_inputs(ean_atoms):
    atoms = ean_atoms(0)
    model = NeuralIL(species=("C", "H", "N", "O"), r_cut=3.5, n_max=4, widths=(16, 8, 8))
    species = np.array([model.species.index(s) for s in atoms.get_chemical_symbols()])
    i, j, S = neighbor_pairs_reference(atoms.positions, atoms.cell[:], atoms.pbc, 3.5)
    return atoms, model, species, (jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32),
                                   jnp.asarray(S, jnp.int32))


@pytest.mark.shared
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_energy_forces_stress_on_ean(ean, dtype):
    atoms, model, species, pairs = _ean_inputs(ean)
    with jax.enable_x64(True):
        params = model.init(jax.random.key(1), jnp.float64)
        out = {}
        for backend, dt in (("reference", jnp.float64), ("numba", jnp.dtype(dtype))):
            f = jax.jit(lambda p, x, c: evaluate(model, p, x, c, jnp.asarray(species), *pairs,
                                                 backend=backend))
            out[backend] = f(jax.tree.map(lambda a: a.astype(dt), params),
                             jnp.asarray(atoms.positions, dt), jnp.asarray(atoms.cell[:], dt))
    tol = TOL[dtype]
    for key in ("energies", "forces", "stress"):
        _close(out["numba"][key], out["reference"][key], tol * (1 if key == "energies" else 10))


@pytest.mark.shared
def test_force_loss_parameter_gradient_double_backward(ean):
    """grad over parameters of a force loss runs through the vjp's transpose (jvp kernel)."""
    atoms, model, species, pairs = _ean_inputs(ean)
    rng = np.random.default_rng(0)
    target = rng.normal(0, 0.5, atoms.positions.shape)
    with jax.enable_x64(True):
        params = model.init(jax.random.key(2), jnp.float64)
        pos = jnp.asarray(atoms.positions)
        cell = jnp.asarray(atoms.cell[:])

        def loss(p, backend):
            out = evaluate(model, p, pos, cell, jnp.asarray(species), *pairs, backend=backend,
                           stress=False)
            return jnp.mean((out["forces"] - target) ** 2) + 1e-3 * out["energy"] ** 2

        g = {b: jax.jit(jax.grad(loss), static_argnums=1)(params, b) for b in ("reference", "numba")}
    for a, b in zip(jax.tree.leaves(g["numba"]), jax.tree.leaves(g["reference"])):
        _close(a, b, 1e-8)


def test_vmap_over_configurations_and_hessian_route():
    n_atoms, n_species = 6, 2
    spec = DescriptorSpec(n_species, 3.0, 3)
    positions, cell, species = _random_system(3, n_atoms, n_species, box=5.0)
    c, j, S, sp = _pairs(positions, cell, 3.0 + 0.5, species)
    with jax.enable_x64(True):
        def energy(pos, backend):
            d = pair_displacements(pos, jnp.asarray(cell), c, j, S)
            X = descriptors(spec, d, c, sp, n_atoms, backend=backend)
            return jnp.sum(jnp.tanh(X))

        batch = jnp.stack([jnp.asarray(positions) + 0.01 * k for k in range(3)])
        for fn in (energy, jax.grad(energy)):
            v = {b: jax.jit(jax.vmap(fn, in_axes=(0, None)), static_argnums=1)(batch, b)
                 for b in ("reference", "numba")}
            _close(v["numba"], v["reference"], 1e-10)
        pos = jnp.asarray(positions)
        h_ref = jax.hessian(energy)(pos, "reference")
        h_num = jax.jit(jax.jacrev(jax.jacrev(energy)), static_argnums=1)(pos, "numba")
        _close(h_num, h_ref, 1e-9)
        with pytest.raises(TypeError, match="forward-mode|custom_vjp"):
            jax.jvp(lambda x: energy(x, "numba"), (pos,), (pos,))


def _padded_configurations(n, n_atoms, n_species, r_cut, seed, box_step, extra_rows, rng):
    """n small random configurations' pairs, padded to one pair count (the longest plus
    ``extra_rows``): displacements (n, P, 3), centres and neighbour species (n, P), numpy,
    and the real pair counts.  Padding rows: centre = n_atoms as the layout says, junk
    displacements and species."""
    rows = []
    for k in range(n):
        positions, cell, species = _random_system(seed + k, n_atoms, n_species,
                                                  box=5.0 + box_step * k)
        c, j, S, sp = _pairs(positions, cell, r_cut, species)
        d = pair_displacements(jnp.asarray(positions), jnp.asarray(cell), c, j, S)
        rows.append((np.asarray(d), np.asarray(c), np.asarray(sp)))
    P = max(len(r[1]) for r in rows) + extra_rows
    d_b = np.stack([np.concatenate([d, rng.normal(0, 1.0, (P - len(d), 3))]) for d, _, _ in rows])
    c_b = np.stack([np.concatenate([c, np.full(P - len(c), n_atoms)]) for _, c, _ in rows])
    s_b = np.stack([np.concatenate([s, rng.integers(0, n_species, P - len(s))])
                    for _, _, s in rows])
    return d_b, c_b, s_b, [len(r[1]) for r in rows]


def padded_batch_outputs(backend, dtype, with_loop=True, with_nested=True):
    """Four small configurations with their own pairs, padded to one pair count, and
    (forward X, force-like vjp, parameter gradient of a force-like loss through the jvp)
    of each: as a loop of single calls, under vmap, and under vmap of vmap.

    Returns (loop [4 x outputs] or None, batched outputs, nested outputs (2, 2, ...) or None,
    real pair counts, calls): ``calls`` reruns (the first configuration alone, the batch).
    """
    n_atoms, n_species, r_cut = 7, 3, 3.2
    spec = DescriptorSpec(n_species, r_cut, 3)
    rng = np.random.default_rng(11)
    d_b, c_b, s_b, n_real = _padded_configurations(4, n_atoms, n_species, r_cut, 20, 0.4, 5, rng)
    P = d_b.shape[1]
    W = rng.normal(size=(n_atoms, spec.n_features))
    G = rng.normal(size=(P, 3))
    with jax.enable_x64(dtype == "float64"):
        d_b = jnp.asarray(d_b, dtype)
        c_b, s_b = jnp.asarray(c_b, jnp.int32), jnp.asarray(s_b, jnp.int32)
        W, G = jnp.asarray(W, dtype), jnp.asarray(G, dtype)

        def outputs(d, c, s, W):
            def desc(d):
                return descriptors(spec, d, c, s, n_atoms, backend=backend)

            force_like = jax.grad(lambda d: jnp.sum(jnp.sin(desc(d) * W)))(d)
            w_grad = jax.grad(lambda W: jnp.sum(G * jax.grad(
                lambda d: jnp.sum(desc(d) * W))(d)))(W)
            return desc(d), force_like, w_grad

        one = jax.jit(outputs)
        loop = [one(d_b[k], c_b[k], s_b[k], W) for k in range(4)] if with_loop else None
        batch_fn = jax.jit(jax.vmap(outputs, in_axes=(0, 0, 0, None)))
        batched = batch_fn(d_b, c_b, s_b, W)

        def rerun(f, *args):
            with jax.enable_x64(dtype == "float64"):
                return jax.block_until_ready(f(*args))

        calls = (lambda: rerun(one, d_b[0], c_b[0], s_b[0], W),
                 lambda: rerun(batch_fn, d_b, c_b, s_b, W))
        nested = None
        if with_nested:
            nested = jax.jit(jax.vmap(jax.vmap(outputs, in_axes=(0, 0, 0, None)),
                                      in_axes=(0, 0, 0, None)))(
                d_b.reshape(2, 2, P, 3), c_b.reshape(2, 2, P), s_b.reshape(2, 2, P), W)
    return loop, batched, nested, n_real, calls


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vmap_is_one_call_over_padded_configurations(dtype):
    """vmap over configurations with their own pairs and padding (one kernel call, rows
    moved together) gives what a loop of single calls gives: forward, vjp (forces) and
    jvp (the parameter gradient of a force loss); also vmap of vmap."""
    loop, batched, nested, n_real, _ = padded_batch_outputs("numba", dtype)
    for k in range(4):
        for a, b, n in zip(batched, loop[k], nested):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(n.reshape((4,) + n.shape[2:])[k]),
                                          np.asarray(b))
        assert not np.any(np.asarray(batched[1][k][n_real[k]:]))  # padding rows: zero gradient


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("members", [3, 17])
def test_vmap_over_cotangents_of_one_geometry(dtype, members):
    """A committee's members: cotangents (tangents) vmapped over one geometry and one
    residual become the kernels' cotangent axis (one call; calls of 16 above that, the
    last padded), inside a vmap over configurations as in training: the forces and the
    parameter gradient of a force loss of each member equal one member at a time, and
    the reference."""
    n_atoms, n_species, r_cut = 7, 3, 3.2
    spec = DescriptorSpec(n_species, r_cut, 3)
    rng = np.random.default_rng(5)
    d_b, c_b, s_b, _ = _padded_configurations(2, n_atoms, n_species, r_cut, 40, 0.5, 3, rng)
    P = d_b.shape[1]
    with jax.enable_x64(dtype == "float64"):
        d_b = jnp.asarray(d_b, dtype)
        c_b, s_b = jnp.asarray(c_b, jnp.int32), jnp.asarray(s_b, jnp.int32)
        Ws = jnp.asarray(rng.normal(size=(members, n_atoms, spec.n_features)), dtype)
        G = jnp.asarray(rng.normal(size=(P, 3)), dtype)

        def per_member(d, c, s, Ws, backend, vmapped):
            X, pullback = jax.vjp(lambda d: descriptors(spec, d, c, s, n_atoms, backend=backend),
                                  d)

            def one(W):
                force_like = pullback(jnp.cos(X) * W)[0]
                w_grad = jax.grad(lambda W: jnp.sum(G * pullback(jnp.sin(X) * W)[0]))(W)
                return force_like, w_grad

            # one member at a time: a sequential loop compiled once (an unrolled Python
            # loop of 17 members took 40 s to compile)
            return jax.vmap(one)(Ws) if vmapped else jax.lax.map(one, Ws)

        def run(backend, vmapped):
            f = jax.vmap(lambda d, c, s: per_member(d, c, s, Ws, backend, vmapped))
            return jax.jit(f)(d_b, c_b, s_b)

        batched, looped, ref = run("numba", True), run("numba", False), run("reference", True)
    for a, b, r in zip(batched, looped, ref):
        assert a.shape == (2, members) + b.shape[2:]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        _close(a, r, TOL[dtype])
