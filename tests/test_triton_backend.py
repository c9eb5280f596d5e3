"""``backend="triton"`` end to end: neighbour lists (host and jitted update) and the model.

On a machine with a CUDA GPU, jax-triton and the ``gpu`` extra this runs the real
thing.  Elsewhere (CI) the kernels run in Triton's interpreter behind a stand-in
for ``jax_triton.triton_call`` (``tests/triton_standin.py``: same calling
convention, through ``jax.pure_callback``), so the project's jax-side wiring --
the jnp binning plan, launch arguments, the custom_vjp with its nested backward,
vmap over configurations, jit -- is checked against the reference on the same
inputs.  The interpreter is slow: the systems are small.
"""
from __future__ import annotations

import numpy as np
import pytest

import triton_standin  # noqa: E402

CUDA = triton_standin.require()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from neuralil_fast import backends, neighbors  # noqa: E402
from neuralil_fast.descriptors import DescriptorSpec, descriptors  # noqa: E402
from neuralil_fast.model import NeuralIL  # noqa: E402
from neuralil_fast.neighbors import allocate, neighbor_pairs, pair_displacements  # noqa: E402
from neuralil_fast.potential import evaluate  # noqa: E402
from test_geometry import cell_from_parameters  # noqa: E402
from test_neighbors import (assert_same_pairs, compressing, naive_pairs,  # noqa: E402
                            random_system, valid_rows)

TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture
def triton(monkeypatch):
    """The real jax-triton on a GPU; the interpreter stand-in without one."""
    if backends.triton_available():
        return
    if CUDA:
        pytest.skip("a CUDA device but no jax-triton: pip install 'neuralil_fast[gpu]'")
    triton_standin.install(monkeypatch)


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("pbc, cellpar, n, r_cut", [
    ((True, True, True), (6.0, 6.5, 7.0, 75.0, 95.0, 105.0), 10, 3.0),
    ((True, False, True), (5.0, 5.0, 6.0, 60.0, 120.0, 80.0), 9, 2.5),
    ((True, True, True), (2.2, 7.0, 6.0, 90.0, 100.0, 90.0), 6, 3.0),  # thinner than r_cut
    ((False, False, False), (6.0, 6.0, 6.0, 90.0, 90.0, 90.0), 8, 3.0),
])
def test_neighbor_pairs_triton_equal_reference(triton, pbc, cellpar, n, r_cut):
    """nf.neighbor_pairs(backend="triton"): the same (i, j, S) set as the brute force,
    atoms outside the cell and a duplicate position included."""
    rng = np.random.default_rng(n)
    cell = cell_from_parameters(*cellpar)
    positions = rng.uniform(-0.3, 1.3, (n, 3)) @ cell
    positions[1] = positions[0]
    got = neighbor_pairs(positions=positions, cell=cell, pbc=pbc, r_cut=r_cut, backend="triton")
    assert_same_pairs(got, naive_pairs(positions, cell, np.array(pbc), r_cut))


def test_neighbor_pairs_triton_bad_input(triton):
    cell = np.eye(3) * 5.0
    x = np.random.default_rng(0).uniform(0, 5, (4, 3))
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        neighbor_pairs(positions=bad, cell=cell, pbc=True, r_cut=2.0, backend="triton")
    with pytest.raises(ValueError, match="singular|degenerate"):
        neighbor_pairs(positions=x, cell=np.zeros((3, 3)), pbc=True, r_cut=2.0, backend="triton")
    with pytest.raises(ValueError, match="r_cut|cutoff"):
        neighbor_pairs(positions=x, cell=cell, pbc=True, r_cut=0.0, backend="triton")


@pytest.mark.parametrize("pbc", [(True, True, True), (True, False, True)])
def test_jitted_update_compression_overflow_and_reallocate(x64, triton, pbc):
    """Compress inside a jitted fori_loop through the Triton build: the flag rises (on
    capacity or on a bin grid the cell has shrunk out of), the host reallocates, and
    the list ends exact."""
    rng = np.random.default_rng(7)
    positions, cell, pbc = random_system(rng, n=10, box=5.0, pbc=pbc)
    r_cut, skin = 2.0, 0.3
    nl = allocate(positions, cell, pbc, r_cut, skin, backend="triton")
    assert nl.backend == "triton" and nl.bin_grid
    cap0, grid0 = nl.capacity, nl.bin_grid
    compress = compressing(4)
    x, c = jnp.asarray(positions), jnp.asarray(cell)
    overflows = 0
    for _ in range(2):
        nl, x, c = compress(nl, x, c)
        if bool(nl.did_overflow):
            overflows += 1
            nl = neighbors.reallocate(nl, np.asarray(x), np.asarray(c))
            assert not bool(nl.did_overflow)
        assert_same_pairs(valid_rows(nl), naive_pairs(np.asarray(x), np.asarray(c), pbc,
                                                      r_cut + skin))
    # 0.98^4 in length is 1.27x the density: more than the 1.25x capacity
    assert overflows >= 1, "the first compression must overflow the first capacity"
    assert nl.capacity > cap0 or nl.bin_grid != grid0


def test_jitted_update_flags_a_grid_the_cell_outgrew(x64, triton):
    """Ample capacity, but the cell shrinks until its bins are narrower than r_cut + skin:
    flagged, never an incomplete list; reallocation picks a finer grid."""
    rng = np.random.default_rng(3)
    cell = cell_from_parameters(9.0, 9.0, 9.0, 90.0, 90.0, 90.0)
    positions = rng.uniform(0, 1, (12, 3)) @ cell
    pbc = np.ones(3, bool)
    nl = allocate(positions, cell, pbc, 2.0, 0.0, backend="triton", capacity=4000)
    assert nl.bin_grid[0] == (3, 3, 3)  # 9 Å / (2 Å x 1.25 margin): 3 bins of 3 Å
    xf, cf = 0.6 * positions, 0.6 * cell  # bins of 1.8 Å
    nl1 = jax.jit(neighbors.update)(nl, jnp.asarray(xf), jnp.asarray(cf))
    assert bool(nl1.did_overflow) and int(nl1.n_pairs) < 4000
    nl2 = neighbors.reallocate(nl1, xf, cf)
    assert not bool(nl2.did_overflow)
    assert_same_pairs(valid_rows(nl2), naive_pairs(xf, cf, pbc, 2.0))


# --------------------------------------------------------------------------- descriptors


def _system(seed, n_atoms, n_species, box):
    rng = np.random.default_rng(seed)
    cell = cell_from_parameters(box, box * 1.05, box * 0.95, 85.0, 95.0, 100.0)
    positions = rng.uniform(0, 1, (n_atoms, 3)) @ cell
    positions[-1] = positions[0] + np.array([1e-3, 0.0, 0.0])  # a very short pair
    species = rng.integers(0, n_species, n_atoms)
    species[:n_species] = np.arange(n_species)
    return positions, cell, species


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_descriptors_and_gradients_match_reference(triton, dtype):
    n_atoms, n_species, r_cut = 5, 2, 3.0
    positions, cell, species = _system(1, n_atoms, n_species, 4.5)
    spec = DescriptorSpec(n_species, r_cut, 2)
    i, j, S = neighbor_pairs(positions=positions, cell=cell, pbc=True, r_cut=r_cut,
                             backend="triton")
    c, j, S, sp = (jnp.asarray(a, jnp.int32) for a in (i, j, S, species[j]))
    W = np.random.default_rng(2).normal(size=(n_atoms, spec.n_features))
    positions = positions.astype(dtype).astype(np.float64)
    with jax.enable_x64(True):
        out = {}
        for backend, dt in (("reference", jnp.float64), ("triton", jnp.dtype(dtype))):
            def f(pos, cel):
                X = descriptors(spec, pair_displacements(pos, cel, c, j, S), c, sp, n_atoms,
                                backend=backend)
                return jnp.sum(jnp.sin(X * jnp.asarray(W, X.dtype))), X
            (_, X), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
                jnp.asarray(positions, dt), jnp.asarray(cell, dt))
            out[backend] = (X, *g)
    tol = TOL[dtype]
    for got, want, t in zip(out["triton"], out["reference"], (tol, 10 * tol, 10 * tol)):
        _close(got, want, t)


@pytest.fixture(scope="module")
def small_model():
    positions, cell, species = _system(4, 6, 2, 4.5)
    model = NeuralIL(species=("H", "O"), r_cut=3.0, n_max=2, widths=(8, 4))
    i, j, S = neighbor_pairs(positions=positions, cell=cell, pbc=True, r_cut=3.0,
                             backend="numba")
    pairs = tuple(jnp.asarray(a, jnp.int32) for a in (i, j, S))
    return model, positions, cell, jnp.asarray(species, jnp.int32), pairs


def test_model_energy_forces_stress_and_force_loss_gradient(triton, small_model):
    """Energy, forces and stress, and the parameter gradient of a force loss (the
    double backward through the vjp's transpose, the jvp kernel), float64."""
    model, positions, cell, species, pairs = small_model
    target = np.random.default_rng(0).normal(0, 0.5, positions.shape)
    with jax.enable_x64(True):
        params = model.init(jax.random.key(1), jnp.float64)
        pos, cel = jnp.asarray(positions), jnp.asarray(cell)

        def run(p, backend):
            return evaluate(model, p, pos, cel, species, *pairs, backend=backend)

        def loss(p, backend):
            out = evaluate(model, p, pos, cel, species, *pairs, backend=backend, stress=False)
            return jnp.mean((out["forces"] - target) ** 2) + 1e-3 * out["energy"] ** 2

        out = {b: jax.jit(run, static_argnums=1)(params, b) for b in ("reference", "triton")}
        g = {b: jax.jit(jax.grad(loss), static_argnums=1)(params, b)
             for b in ("reference", "triton")}
    for key in ("energies", "forces", "stress"):
        _close(out["triton"][key], out["reference"][key], 1e-9)
    for a, b in zip(jax.tree.leaves(g["triton"]), jax.tree.leaves(g["reference"])):
        _close(a, b, 1e-8)


def test_vmap_over_configurations(triton, small_model):
    """vmap over configurations through the model (one launch per kernel for the batch)."""
    model, positions, cell, species, pairs = small_model
    with jax.enable_x64(True):
        params = model.init(jax.random.key(3), jnp.float64)
        batch = jnp.stack([jnp.asarray(positions) + 0.01 * k for k in range(3)])

        def forces(x, backend):
            return evaluate(model, params, x, jnp.asarray(cell), species, *pairs,
                            backend=backend, stress=False)["forces"]

        v = {b: jax.jit(jax.vmap(forces, in_axes=(0, None)), static_argnums=1)(batch, b)
             for b in ("reference", "triton")}
    _close(v["triton"], v["reference"], 1e-9)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vmap_is_one_launch_over_padded_configurations(triton, dtype):
    """jax-triton has no batching rule: under vmap the project's rule makes one launch of
    the batch's configurations moved together (kernels_api._one_call_per_batch, as for
    numba).  Forward, vjp and the jvp of a force-like loss of the batch against the
    reference, configuration by configuration; as many launches as for one configuration."""
    from test_kernels_jax import padded_batch_outputs

    # (the loop of single calls and vmap of vmap: tested with numba, slow here)
    _, batched, _, n_real, (single, batch) = padded_batch_outputs(
        "triton", dtype, with_loop=False, with_nested=False)
    ref = padded_batch_outputs("reference", dtype, with_nested=False)[0]
    for k in range(4):
        for a, r in zip(batched, ref[k]):
            _close(a[k], r, TOL[dtype])
        assert not np.any(np.asarray(batched[1][k][n_real[k]:]))  # padding rows: zero gradient
    if not CUDA:  # the stand-in counts its launches: the batch makes as many as one config
        launches = []
        for call in (single, batch):
            triton_standin.LAUNCHES.clear()
            call()
            launches.append(dict(triton_standin.LAUNCHES))
        assert launches[0] and launches[1] == launches[0]


def test_ase_calculator_triton_backend(triton, small_model):
    """The user path: nf.Calculator(backend="triton") -- host neighbour list, jitted
    update with a skin, descriptors, energy / forces / stress -- against the reference
    calculator, before and after a move that forces a rebuild."""
    from ase import Atoms

    from neuralil_fast.calculator import Calculator

    model, positions, cell, species, _ = small_model
    with jax.enable_x64(True):
        params = model.init(jax.random.key(5), jnp.float64)
    atoms = Atoms([model.species[k] for k in np.asarray(species)], positions=positions,
                  cell=cell, pbc=True)
    calcs = {b: Calculator(model, params, backend=b, skin=0.3) for b in ("reference", "triton")}
    step = np.random.default_rng(1).normal(0, 0.3, positions.shape)  # > skin / 2: rebuild
    for x in (positions, positions + step):
        got = {}
        for b, calc in calcs.items():
            a = atoms.copy()
            a.positions = x
            a.calc = calc
            got[b] = (a.get_potential_energy(), a.get_forces(), a.get_stress())
        for t, r in zip(got["triton"], got["reference"]):
            _close(t, r, 1e-9)
