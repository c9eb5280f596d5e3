"""Training: losses, gradients, padding, committees, the loop, checkpoints, CLI, calculator.

Tiny models (widths (8, 8), n_max 2) on tiny synthetic data: small periodic boxes
labelled by ASE's smooth Lennard-Jones pair potential.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from neuralil_fast.committee import (committee_evaluate_jit, committee_size, load_any, member,
                                     stack, summarize)
from neuralil_fast.io import Configuration, from_atoms, to_atoms
from neuralil_fast.model import NeuralIL, load
from neuralil_fast.training.data import PaddedData, pad_configurations, split_indices, take
from neuralil_fast.training.losses import LossConfig, log_cosh, loss_terms, total_loss
from neuralil_fast.training.loop import TrainConfig, Trainer, _loss_fn, ema_decay

SPECIES = ("H", "O")
R_CUT = 3.0


def tiny_model(**kw):
    settings = dict(species=SPECIES, r_cut=R_CUT, n_max=2, embed_dim=2, widths=(8, 8))
    settings.update(kw)
    return NeuralIL(**settings)


def unpadded_args(model, c):
    """(positions, cell, species, centers, neighbors, shifts) of configuration ``c`` with its
    own neighbour list: the single-model path's input, the oracle of the padded batch."""
    from neuralil_fast.geometry import species_indices
    from neuralil_fast.neighbors import allocate

    nl = allocate(c.positions, c.cell, c.pbc, model.r_cut, backend="reference")
    return (jnp.asarray(c.positions), jnp.asarray(c.cell),
            jnp.asarray(species_indices(c.numbers, model.species)), nl.centers, nl.neighbors,
            nl.shifts)


def lj_configs(n, seed=0, sizes=(6, 7, 8), box=4.6):
    """Random periodic boxes labelled with ASE's smooth Lennard-Jones potential (eV, Å)."""
    from ase.calculators.lj import LennardJones

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = int(rng.choice(sizes))
        atoms = Atoms(symbols=list(rng.choice(SPECIES, size=k)),
                      positions=rng.uniform(0, box, (k, 3)), cell=np.eye(3) * box, pbc=True)
        d = atoms.get_all_distances(mic=True)[np.triu_indices(k, 1)]
        if d.min() < 1.45:
            continue
        atoms.calc = LennardJones(sigma=1.4, epsilon=0.3, rc=R_CUT, smooth=True)
        out.append(Configuration(symbols=atoms.get_chemical_symbols(),
                                 positions=atoms.positions, cell=atoms.cell.array, pbc=True,
                                 energy=atoms.get_potential_energy(),
                                 forces=atoms.get_forces()))
    return out


def write_extxyz(path, configs):
    from neuralil_fast.io import write_dataset

    write_dataset(path, configs)
    return path


# --------------------------------------------------------------------------- losses


def test_log_cosh_stable():
    x = np.array([0.0, 0.3, -2.0, 50.0, -400.0])
    ref = np.where(np.abs(x) < 20, np.log(np.cosh(np.clip(x, -20, 20))), np.abs(x) - np.log(2))
    np.testing.assert_allclose(np.asarray(log_cosh(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["logcosh-norm", "logcosh-components", "mse"])
def test_loss_values_by_hand(kind):
    rng = np.random.default_rng(1)
    B, N = 3, 4
    n_atoms = np.array([4.0, 2.0, 3.0])
    mask = (np.arange(N)[None] < n_atoms[:, None]).astype(np.float64)
    weight = np.array([1.0, 1.0, 0.0])          # the last configuration is batch padding
    Fp, Fr = rng.normal(size=(B, N, 3)), rng.normal(size=(B, N, 3))
    Ep, Er = rng.normal(size=B) * 0.1, rng.normal(size=B) * 0.1
    cfg = LossConfig(kind=kind)
    f, e = loss_terms(cfg, jnp.asarray(Ep), jnp.asarray(Er), jnp.asarray(n_atoms),
                      jnp.asarray(weight), jnp.asarray(Fp), jnp.asarray(Fr), jnp.asarray(mask))
    # by hand, over the real atoms of the real configurations only
    atoms = [(b, i) for b in range(2) for i in range(int(n_atoms[b]))]
    dF = np.array([Fp[b, i] - Fr[b, i] for b, i in atoms])
    dE = (Ep[:2] - Er[:2]) / n_atoms[:2]
    lc = lambda x: np.log(np.cosh(x))
    if kind == "logcosh-norm":
        f_ref = np.mean(lc(np.linalg.norm(dF, axis=1) / 0.2))
        e_ref = np.mean(lc(dE / 0.02))
    elif kind == "logcosh-components":
        f_ref = np.mean(lc(10.0 * dF) / 10.0)
        e_ref = np.mean(lc(dE / 0.02))
    else:
        f_ref = np.mean(np.sum(dF**2, axis=1)) / 0.04
        e_ref = np.mean(dE**2) / 0.02**2
    np.testing.assert_allclose(float(f), f_ref, rtol=1e-5)
    np.testing.assert_allclose(float(e), e_ref, rtol=1e-5)
    args = (jnp.asarray(Ep), jnp.asarray(Er), jnp.asarray(n_atoms), jnp.asarray(weight),
            jnp.asarray(Fp), jnp.asarray(Fr), jnp.asarray(mask))
    np.testing.assert_allclose(float(total_loss(cfg, *args)), 0.5 * f_ref + 0.5 * e_ref, rtol=1e-5)
    only_e = LossConfig(kind=kind, force_weight=0.0)
    np.testing.assert_allclose(float(total_loss(only_e, *args)), 0.5 * e_ref, rtol=1e-5)


def test_loss_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(kind="huber")
    with pytest.raises(ValueError, match="weights"):
        LossConfig(force_weight=0.0, energy_weight=0.0)


# --------------------------------------------------------------------------- padding, committees


@pytest.fixture(scope="module")
def configs():
    return lj_configs(14, seed=0)


def test_split_indices():
    tr, va = split_indices(60, 12, 0)
    perm = np.random.default_rng(0).permutation(60)
    assert list(tr) == list(perm[:48]) and list(va) == list(perm[48:])
    with pytest.raises(ValueError):
        split_indices(5, 5)


def test_padding_does_not_change_results(configs, x64):
    from neuralil_fast.potential import evaluate_jit

    model = tiny_model()
    params = model.init(jax.random.key(1), jnp.float64)
    few = [configs[0], configs[1], configs[2]]
    data = pad_configurations(few, model.species, model.r_cut, "reference", np.float64,
                              max_atoms=11, capacity=300)
    P = stack([params])
    for k, c in enumerate(few):
        row = take(data, k)
        out = committee_evaluate_jit(model, P, jnp.asarray(row.positions), jnp.asarray(row.cell),
                                 jnp.asarray(row.species), jnp.asarray(row.centers),
                                 jnp.asarray(row.neighbors), jnp.asarray(row.shifts),
                                 atom_mask=jnp.asarray(row.atom_mask))
        ref = evaluate_jit(model, params, *unpadded_args(model, c), stress=False)
        n = c.n_atoms
        np.testing.assert_allclose(float(out["energy"][0]), float(ref["energy"]), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(out["forces"][0, :n]), np.asarray(ref["forces"]),
                                   rtol=1e-10, atol=1e-12)
        assert np.all(np.asarray(out["forces"][0, n:]) == 0)
        assert np.all(np.asarray(out["energies"][0, n:]) == 0)


def test_committee_mean_and_spread_match_members(configs, x64):
    from neuralil_fast.potential import evaluate_jit

    model = tiny_model()
    members = [model.init(jax.random.key(k), jnp.float64) for k in range(3)]
    P = stack(members)
    assert committee_size(P) == 3
    args = unpadded_args(model, configs[3])
    out = committee_evaluate_jit(model, P, *args, stress=True)
    refs = [evaluate_jit(model, p, *args) for p in members]
    for k, ref in enumerate(refs):
        for name in ("energy", "energies", "forces", "stress"):
            np.testing.assert_allclose(np.asarray(out[name][k]), np.asarray(ref[name]),
                                       rtol=1e-10, atol=1e-12)
    s = summarize(out)
    E = np.array([float(r["energy"]) for r in refs])
    F = np.stack([np.asarray(r["forces"]) for r in refs])
    np.testing.assert_allclose(float(s["energy"]), E.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(s["energy_uncertainty"]), E.std(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(s["forces"]), F.mean(0), rtol=1e-10, atol=1e-12)
    spread = np.sqrt(np.mean(np.sum((F - F.mean(0)) ** 2, axis=-1), axis=0))
    np.testing.assert_allclose(np.asarray(s["forces_uncertainty"]), spread, rtol=1e-10)
    for k in range(3):
        for a, b in zip(jax.tree.leaves(member(P, k)), jax.tree.leaves(members[k])):
            assert np.array_equal(a, b)


# --------------------------------------------------------------------------- gradients, loop


def test_force_loss_gradient_matches_finite_differences(configs, x64):
    model = tiny_model()
    data = pad_configurations(configs[:4], model.species, model.r_cut, "reference", np.float64)
    cfg = TrainConfig(batch_size=4, backend="reference",
                      loss=LossConfig(kind="logcosh-norm", energy_weight=0.0))
    trainer = Trainer(model, data, None, cfg)
    params = stack([model.init(jax.random.key(2), jnp.float64)])
    idx = jnp.arange(4, dtype=jnp.int32)
    w = jnp.ones(4)
    loss = jax.jit(lambda p: trainer._loss(p, trainer.train, idx, w)[0])
    g = jax.jit(jax.grad(loss))(params)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    eps = 1e-5
    plus = loss(jax.tree.map(lambda a, b: a + eps * b, params, v))
    minus = loss(jax.tree.map(lambda a, b: a - eps * b, params, v))
    fd = (plus - minus) / (2 * eps)
    an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    np.testing.assert_allclose(float(an), float(fd), rtol=1e-6)
    assert abs(float(an)) > 1e-6


def test_training_decreases_validation_error(configs):
    model = tiny_model()
    data = pad_configurations(configs, model.species, model.r_cut, "reference")
    train, valid = take(data, np.arange(10)), take(data, np.arange(10, 14))
    cfg = TrainConfig(epochs=30, batch_size=4, backend="reference", committee=2)
    trainer = Trainer(model, train, valid, cfg)
    state = trainer.init_state()
    before = trainer.validate(state.params)["all"]
    written = []
    state = trainer.fit(state, on_checkpoint=lambda st: written.append(st.epoch),
                        checkpoint_seconds=1e9)
    assert written == [1, 30]  # throttled: after the first and the last epoch only
    after = trainer.validate(trainer.final_params(state))["all"]
    assert after["force_mae_mev_A"] < 0.7 * before["force_mae_mev_A"], (before, after)
    assert len(state.history) == 30
    assert state.best_metric == min(h["valid"]["all"]["force_mae_mev_A"] for h in state.history)


def test_forces_only_fits_energy_offset(configs):
    model = tiny_model()
    data = pad_configurations(configs[:8], model.species, model.r_cut, "reference")
    cfg = TrainConfig(epochs=2, batch_size=4, backend="reference",
                      loss=LossConfig(energy_weight=0.0))
    trainer = Trainer(model, data, None, cfg)
    state = trainer.fit(trainer.init_state())
    params = trainer.final_params(state)
    E, _ = trainer.predict(params, trainer.train)
    n = np.asarray(data.n_atoms, np.float64)
    resid = np.array([c.energy for c in configs[:8]]) - E[:, 0]
    # least squares in the per-atom offset: the residuals are orthogonal to the atom counts
    assert abs(np.sum(resid * n)) / np.sum(n * np.abs(resid)) < 1e-3


# --------------------------------------------------------------------------- species energies

# eV per atom, of the size of isolated-atom energies in DFT: data of varying composition
# carry tens of eV per atom that one common offset cannot take up
OFFSETS = {"H": -13.6, "O": -432.1}


def _offset(c):
    return Configuration(symbols=c.symbols, positions=c.positions, cell=c.cell, pbc=c.pbc,
                         energy=c.energy + sum(OFFSETS[s] for s in c.symbols),
                         forces=c.forces)


def test_fit_species_energies_is_the_least_squares_fit():
    from neuralil_fast.training.data import common_energy_per_atom, fit_species_energies

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 9, (20, 3)) + [1, 0, 0]
    b = np.array([-13.6, -432.1, -148.7])
    np.testing.assert_allclose(fit_species_energies(counts, counts @ b), b, rtol=1e-12)
    E = counts @ b + rng.normal(0, 0.3, 20)  # noisy: the normal equations hold
    r = E - counts @ fit_species_energies(counts, E)
    assert np.abs(counts.T @ r).max() < 1e-9 * np.abs(counts.T @ E).max()
    # one composition (proportional rows), one species absent: the common offset for all
    one, E = np.array([[2, 0, 6], [3, 0, 9], [1, 0, 3]]), np.array([-70.0, -101.0, -36.0])
    n = one.sum(1)
    np.testing.assert_allclose(fit_species_energies(one, E), [n @ E / (n @ n)] * 3, rtol=1e-12)
    # the common offset, one per column (committee members): each column's own least squares
    cols = np.stack([E, 2 * E + n], axis=1)
    c = common_energy_per_atom(n, cols)
    assert c.shape == (2,)
    for k in range(2):
        np.testing.assert_allclose(c[k], np.linalg.lstsq(n[:, None], cols[:, k])[0][0],
                                   rtol=1e-12)


def test_species_energies_only_where_compositions_vary(configs):
    from types import SimpleNamespace

    from neuralil_fast.training.cli import _with_species_energies

    model = tiny_model()
    # the same boxes relabelled half H, half O: one composition
    even = [Configuration(symbols=["H", "O"] * (c.n_atoms // 2),
                          positions=c.positions[:c.n_atoms // 2 * 2], cell=c.cell, pbc=True,
                          energy=c.energy) for c in configs]
    for data, mode, fitted in [(configs, "auto", True), (even, "auto", False),
                               (even, "fit", True), (configs, "none", False)]:
        padded = pad_configurations(data, model.species, model.r_cut, "reference")
        got = _with_species_energies(SimpleNamespace(species_energies=mode), model, padded,
                                     [c.energy for c in data]).species_energies
        assert (got is not None) == fitted, (mode, fitted)
        if data is even and got is not None:  # one composition: one common offset
            assert got[0] == pytest.approx(got[1], rel=1e-9)


def test_forces_only_refits_species_energies(configs, x64):
    """Training on forces leaves each species' energy free: afterwards the table is refitted
    so that the residual energies are orthogonal to every species' atom counts."""
    from neuralil_fast.training.data import species_counts

    model = tiny_model(species_energies=(0.0, 0.0))  # a wrong table to start from
    shifted = [_offset(c) for c in configs[:10]]
    data = pad_configurations(shifted, model.species, model.r_cut, "reference", np.float64)
    cfg = TrainConfig(epochs=2, batch_size=4, backend="reference",
                      loss=LossConfig(energy_weight=0.0))
    trainer = Trainer(model, data, None, cfg)
    state = trainer.fit(trainer.init_state())
    params = state.best_params
    energy, counts = np.array([c.energy for c in shifted]), species_counts(data, 2)

    def normal_equations():
        return np.abs(counts.T @ (energy - trainer.predict(params, trainer.train)[0][:, 0]))

    before = normal_equations().max()
    params = trainer.final_params(state)  # refits the table, then each member's offset
    assert normal_equations().max() < 1e-9 * before
    # the table takes up the offsets' difference (their common part went into the biases
    # at the start, from the wrong table; the LJ part and the networks' energies aside)
    table = np.asarray(trainer.model.species_energies)
    assert table[1] - table[0] == pytest.approx(OFFSETS["O"] - OFFSETS["H"], abs=2.0)


def _without_forces(c):
    return Configuration(symbols=c.symbols, positions=c.positions, cell=c.cell, pbc=c.pbc,
                         energy=c.energy)


def test_configurations_without_forces_enter_only_the_energy_term(configs, dtype, tol):
    """Configurations 1 and 3 of four carry no forces: the loss (and its gradient) is the
    force term of configurations 0 and 2 plus the energy term of all four, each computed
    on fully labelled data; validation metrics likewise; their zero stand-in forces never
    count (a garbage stand-in changes nothing)."""
    model = tiny_model()
    np_dtype = np.dtype(jnp.dtype(dtype).name)
    four = configs[:4]
    mixed = [c if k % 2 == 0 else _without_forces(c) for k, c in enumerate(four)]

    def pad(cs):  # one shape for every set: one compilation per loss
        return pad_configurations(cs, model.species, model.r_cut, "reference", np_dtype,
                                  max_atoms=8, capacity=160)

    data, full = pad(mixed), pad(four)
    assert list(np.asarray(data.force_mask)) == [1, 0, 1, 0]
    assert not np.any(np.asarray(data.forces)[[1, 3]])
    params = stack([model.init(jax.random.key(3), dtype)])
    idx = jnp.arange(4, dtype=jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_grad(loss, data, weight):
        return jax.value_and_grad(lambda p: _loss_fn(model, "reference", loss, p, data, idx,
                                                     weight)[0])(params)

    ones, even = jnp.ones(4, dtype), jnp.asarray([1, 0, 1, 0], dtype)
    l_mixed, g_mixed = loss_and_grad(LossConfig(), data, ones)
    l_f, g_f = loss_and_grad(LossConfig(energy_weight=0.0), full, even)  # forces of 0 and 2
    l_e, g_e = loss_and_grad(LossConfig(force_weight=0.0), full, ones)
    assert float(l_f) > 0.1 * float(l_e) > 0  # both terms matter in the sum
    np.testing.assert_allclose(float(l_mixed), float(l_f + l_e), rtol=tol["rtol"])
    for a, b, c in zip(jax.tree.leaves(g_mixed), jax.tree.leaves(g_f), jax.tree.leaves(g_e)):
        scale = float(jnp.max(jnp.abs(b + c))) + 1e-30
        np.testing.assert_allclose(np.asarray(a), np.asarray(b + c), rtol=tol["rtol"],
                                   atol=10 * tol["atol"] * scale)
    garbage = dataclasses.replace(data, forces=np.where(
        np.asarray(data.force_mask)[:, None, None] > 0, data.forces, 1e3).astype(np_dtype))
    assert float(loss_and_grad(LossConfig(), garbage, ones)[0]) == float(l_mixed)

    def validate(train, valid):
        trainer = Trainer(model, train, valid, TrainConfig(backend="reference"))
        return trainer, trainer.validate(params)["all"]

    trainer, got = validate(data, data)
    _, labelled = validate(full, pad([four[0], four[2]] * 2))  # the mean over 0 and 2
    _, everything = validate(full, full)
    for key in ("force_mae_mev_A", "force_rmse_mev_A"):
        np.testing.assert_allclose(got[key], labelled[key], rtol=tol["rtol"])
        assert not np.isclose(got[key], everything[key], rtol=1e-3)
    np.testing.assert_allclose(got["energy_mae_mev_atom"], everything["energy_mae_mev_atom"],
                               rtol=tol["rtol"])
    assert trainer.selection_key == "force_mae_mev_A"


def test_training_without_any_forces(configs):
    """Energy-only data: force-trained runs refuse it; energy-only runs select on energy."""
    model = tiny_model()
    data = pad_configurations([_without_forces(c) for c in configs[:4]], model.species,
                              model.r_cut, "reference")
    with pytest.raises(ValueError, match="no training configuration carries forces"):
        Trainer(model, data, None, TrainConfig(backend="reference"))
    trainer = Trainer(model, data, data, TrainConfig(epochs=1, batch_size=4, backend="reference",
                                                     loss=LossConfig(force_weight=0.0)))
    state = trainer.fit(trainer.init_state())
    metrics = state.history[0]["valid"]["all"]
    assert "force_mae_mev_A" not in metrics and trainer.selection_key == "energy_mae_mev_atom"
    assert state.best_metric == metrics["energy_mae_mev_atom"] > 0
    labelled = pad_configurations(configs[:4], model.species, model.r_cut, "reference")
    forces_train = Trainer(model, labelled, data, TrainConfig(backend="reference"))
    assert forces_train.selection_key == "energy_mae_mev_atom"  # nothing else to follow


# --------------------------------------------------------------------------- size groups


def test_size_groups_minimise_padded_slots_like_brute_force():
    """The dynamic programme against every split of the sorted atom counts into runs."""
    import itertools
    from types import SimpleNamespace

    from neuralil_fast.training.data import size_groups

    def padded(n, counts_by_size, groups, batch):
        return sum(math.ceil(len(g) / batch) * batch * max(n[g]) for g in groups)

    rng = np.random.default_rng(1)
    for _ in range(200):
        n = rng.integers(1, 40, size=int(rng.integers(1, 20)))
        G, B = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        data = SimpleNamespace(n_atoms=n, max_atoms=int(n.max()), capacity=7,
                               centers=np.where(np.arange(7) < n[:, None] % 8, 0, n.max()))
        got = size_groups(data, G, B)
        assert len(got) <= G
        assert sorted(np.concatenate([g.indices for g in got]).tolist()) == list(range(len(n)))
        for g in got if G > 1 else ():
            assert g.atoms == n[g.indices].max()
            assert g.pairs == max(1, (n[g.indices] % 8).clip(max=7).max())
        sizes = np.unique(n)
        best = min(
            padded(n, None, [np.flatnonzero((n >= sizes[a]) & (n <= sizes[b - 1]))
                             for a, b in zip((0, *cuts), (*cuts, len(sizes)))], B)
            for k in range(min(G, len(sizes)))
            for cuts in itertools.combinations(range(1, len(sizes)), k))
        assert padded(n, None, [g.indices for g in got], B) == best
        if G == 1:
            assert got[0].atoms == n.max() and got[0].pairs == 7


@pytest.fixture(scope="module")
def mixed_sizes():
    """Twelve configurations of 3-4 and 10-11 atoms: two natural size groups."""
    small, large = lj_configs(6, seed=4, sizes=(3, 4)), lj_configs(6, seed=5, sizes=(10, 11))
    return [c for pair in zip(small, large) for c in pair]


def test_narrowed_batch_gives_the_same_loss_and_gradient(mixed_sizes, dtype, tol):
    """A batch of small configurations on arrays narrowed to their window = on the full,
    padded arrays (loss and parameter gradient)."""
    from neuralil_fast.training.data import narrow, size_groups

    model = tiny_model()
    np_dtype = np.dtype(jnp.dtype(dtype).name)
    data = pad_configurations(mixed_sizes, model.species, model.r_cut, "reference", np_dtype)
    small = size_groups(data, 2, 4)[0]
    assert small.atoms <= 4 < data.max_atoms and small.pairs < data.capacity
    idx = jnp.asarray(small.indices[:4], jnp.int32)
    params = stack([model.init(jax.random.key(5), dtype)])
    w = jnp.ones(4, dtype)

    def value_and_grad(window):
        return jax.jit(jax.value_and_grad(lambda p: _loss_fn(
            model, "reference", LossConfig(), p, data, idx, w, window)[0]))(params)

    (l_full, g_full), (l_narrow, g_narrow) = value_and_grad(None), value_and_grad(
        (small.atoms, small.pairs))
    assert float(l_full) > 0
    np.testing.assert_allclose(float(l_narrow), float(l_full), rtol=tol["rtol"])
    for a, b in zip(jax.tree.leaves(g_narrow), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol["rtol"],
                                   atol=tol["atol"] * float(jnp.max(jnp.abs(b)) + 1e-30))
    narrowed = narrow(take(data, idx), small.atoms, small.pairs)
    assert narrowed.positions.shape[1] == small.atoms
    assert int(jnp.max(narrowed.centers)) == small.atoms  # padding rows point past the atoms


def test_size_groups_train_predict_and_resume(mixed_sizes, tmp_path, x64):
    """With size groups: every configuration once per epoch, each batch from one group;
    predictions equal the ungrouped ones; each group's configurations sit on the device
    narrowed to its window, and an epoch on them takes the same steps as the whole padded
    set narrowed inside each step; a resumed run repeats the uninterrupted one."""
    from neuralil_fast.training.data import group_configurations, to_device
    from neuralil_fast.training.loop import learning_rate

    model = tiny_model()
    data = pad_configurations(mixed_sizes, model.species, model.r_cut, "reference", np.float64)
    train, valid = take(data, np.arange(9)), take(data, np.arange(9, 12))

    def trainer(groups, epochs=2):
        return Trainer(model, train, valid, TrainConfig(epochs=epochs, batch_size=3,
                                                        backend="reference",
                                                        size_groups=groups))

    grouped, plain = trainer(2), trainer(1)
    assert len(grouped.train_groups) == 2 and len(plain.train_groups) == 1
    sizes = np.asarray(train.n_atoms)
    for epoch in range(3):
        batches = grouped.epoch_batches(epoch)
        assert len(batches) == grouped.steps_per_epoch
        seen = np.concatenate([idx for idx, _, _ in batches])
        assert sorted(seen.tolist()) == list(range(9))
        for idx, pad, (atoms, _) in batches:
            assert sizes[idx].max() <= atoms and sizes[pad] <= atoms
    orders = [np.concatenate([b[0] for b in grouped.epoch_batches(e)]) for e in (0, 1)]
    assert not np.array_equal(*orders)  # a new order each epoch
    params = stack([model.init(jax.random.key(6), jnp.float64)])
    for data_set in (train, grouped.valid):
        (E1, F1), (E2, F2) = grouped.predict(params, data_set), plain.predict(params, data_set)
        np.testing.assert_allclose(E1, E2, rtol=1e-12)
        np.testing.assert_allclose(F1, F2, rtol=1e-10, atol=1e-12)
    # other data kept as size groups: predicted on its own parts
    E3, F3 = plain.predict(params, group_configurations(
        mixed_sizes[:9], model.species, model.r_cut, "reference", np.float64, max_groups=2,
        batch=3))
    E1, F1 = grouped.predict(params, train)
    np.testing.assert_allclose(E3, E1, rtol=1e-12)
    np.testing.assert_allclose(F3, F1[:, :, :F3.shape[2]], rtol=1e-10, atol=1e-12)

    parts = grouped._parts["train"]
    assert len(parts) == 2 and grouped.train is train      # the full set stays on the host
    assert sum(p.positions.shape[0] * p.max_atoms for p in parts) < len(train) * train.max_atoms
    assert sum(p.centers.size for p in parts) < train.centers.size
    state = grouped.init_state()
    params, opt_state, full = state.params, state.opt_state, to_device(train)
    batches = grouped.epoch_batches(0)
    grouped.run_epoch(state)
    for step, (idx, pad, window) in enumerate(batches):     # the oracle: one storage
        weight = (np.arange(3) < len(idx)).astype(np.float64)
        idx = np.concatenate([idx, np.full(3 - len(idx), pad)])
        lr = learning_rate(grouped.cfg, step, grouped.steps_per_epoch, None)
        params, opt_state, _ = grouped._step(params, opt_state, full, jnp.asarray(idx, jnp.int32),
                                             jnp.asarray(weight), jnp.asarray(lr), window)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)

    whole = grouped.fit(grouped.init_state())
    # the sets kept as size groups (GroupedData), never padded to the largest: the same run
    stored = Trainer(model, *(group_configurations(
        part, model.species, model.r_cut, "reference", np.float64, max_groups=2, batch=b)
        for part, b in ((mixed_sizes[:9], 3), (mixed_sizes[9:], 1))), grouped.cfg)
    assert _params_equal(stored.fit(stored.init_state()).params, whole.params)
    first = trainer(2, epochs=1)
    first.fit(first.init_state(), state_path=tmp_path / "s.state")
    again = trainer(2)
    resumed = again.fit(again.load_state(tmp_path / "s.state"))
    assert _params_equal(resumed.params, whole.params)
    assert not _params_equal(whole.params, plain.fit(plain.init_state()).params)


@pytest.fixture(scope="module")
def mixed_partly_labelled(mixed_sizes):
    """mixed_sizes with two configurations (one small, one large) without forces."""
    return [dataclasses.replace(c, forces=None) if k in (4, 7) else c
            for k, c in enumerate(mixed_sizes)]


def test_grouped_data_is_the_padded_set_narrowed_per_group(mixed_partly_labelled):
    """group_configurations stores each size group as the padded set narrowed to the
    group's window, bit for bit, without padding the set to the largest; its per-
    configuration views, species counts and closest approach are the padded set's, and
    regroup moves configurations between any groupings."""
    from neuralil_fast.training.data import (closest_approach, group_configurations, narrow,
                                             regroup, size_groups, species_counts)

    model, configs = tiny_model(), mixed_partly_labelled
    dense = pad_configurations(configs, model.species, model.r_cut, "reference", np.float64)

    def assert_same(a, b):
        for f in dataclasses.fields(a):
            x, y = np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name))
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)

    for G, B in ((1, 4), (2, 3), (3, 1)):
        grouped = group_configurations(configs, model.species, model.r_cut, "reference",
                                       np.float64, max_groups=G, batch=B)
        want = size_groups(dense, G, B)
        assert len(grouped.groups) == len(want) == G           # four sizes: 3, 4, 10, 11
        for g, w, part in zip(grouped.groups, want, grouped.parts):
            assert (g.atoms, g.pairs) == (w.atoms, w.pairs)
            np.testing.assert_array_equal(g.indices, w.indices)
            assert_same(part, narrow(take(dense, g.indices), g.atoms, g.pairs))
        assert len(grouped) == len(dense) and grouped.max_atoms == dense.max_atoms
        for name in ("n_atoms", "energy", "force_mask", "forces", "atom_mask"):
            np.testing.assert_array_equal(getattr(grouped, name), getattr(dense, name))
        np.testing.assert_array_equal(species_counts(grouped, 2), species_counts(dense, 2))
        np.testing.assert_array_equal(closest_approach(grouped, 2, model.r_cut),
                                      closest_approach(dense, 2, model.r_cut))
        if G > 1:  # memory: the groups' windows, not all x the largest
            assert sum(p.centers.size for p in grouped.parts) < dense.centers.size
            assert sum(p.positions.size for p in grouped.parts) < dense.positions.size
        other = size_groups(dense, 2, 2)
        for a, b in zip(regroup(grouped, other).parts, regroup(dense, other).parts):
            assert_same(a, b)
    assert np.any(dense.force_mask == 0)
    with pytest.raises(ValueError, match="configuration 1: .*Xe"):
        group_configurations([configs[0], dataclasses.replace(configs[1], symbols=["Xe"] *
                                                              configs[1].n_atoms)],
                             model.species, model.r_cut, "reference", max_groups=2)


def test_trainer_restores_grouped_data_in_its_own_groups(mixed_partly_labelled):
    """GroupedData whose groups are not the run's is re-stored in the run's: with one
    size group the Trainer holds the padded sets themselves (the training on GroupedData
    itself: test_size_groups_train_predict_and_resume)."""
    from neuralil_fast.training.data import GroupedData, group_configurations

    model, configs = tiny_model(), mixed_partly_labelled

    def trainer(G, built):
        sets = [group_configurations(part, model.species, model.r_cut, "reference",
                                     np.float32, max_groups=built, batch=1)
                for part in (configs[:9], configs[9:])]
        return Trainer(model, *sets, TrainConfig(batch_size=3, size_groups=G,
                                                 backend="reference"))

    one = trainer(1, 2)
    for data, part in ((one.train, configs[:9]), (one.valid, configs[9:])):
        assert isinstance(data, PaddedData)
        want = pad_configurations(part, model.species, model.r_cut, "reference", np.float32)
        for x, y in zip(jax.tree.leaves(data), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x, y)
    two = trainer(2, 3)                            # three groups given, two run
    assert isinstance(two.train, GroupedData) and len(two.train.groups) == 2
    for g, h, part in zip(two.train_groups, two.train.groups, two._parts["train"]):
        np.testing.assert_array_equal(g.indices, h.indices)
        assert part.positions.shape[:2] == (len(g.indices), g.atoms)


def test_validation_metrics_of_the_committee_mean_over_labelled_atoms(mixed_partly_labelled,
                                                                      x64):
    """validate(), built per prediction call without the set's C x K x N x 3 forces,
    equals the MAE / RMSE written out from the whole set's predictions (committee of 2,
    size groups, configurations without forces, outliers left out); the energies alone
    are the same without forces."""
    model, configs = tiny_model(), mixed_partly_labelled
    valid_ids = np.arange(3, 12)                  # 4 and 7 unlabelled; 6 and 11 outliers
    sets = [pad_configurations([configs[k] for k in ids], model.species, model.r_cut,
                               "reference", np.float64) for ids in (range(3), valid_ids)]
    trainer = Trainer(model, *sets, TrainConfig(batch_size=2, size_groups=2, committee=2,
                                                backend="reference"),
                      valid_ids=valid_ids, outliers=(6, 11))
    assert len(trainer.valid_groups) == 2
    params = trainer.init_state().params
    E, F = trainer.predict(params, trainer.valid)
    E_only, none = trainer.predict(params, trainer.valid, forces=False)
    assert none is None and np.array_equal(E_only, E)
    got = trainer.validate(params)

    def by_hand(keep):
        counted = [k for k, i in enumerate(valid_ids) if keep(i)]
        v = take(sets[1], np.asarray(counted))
        dE = (E[counted].mean(1) - np.asarray(v.energy)) / np.asarray(v.n_atoms)
        dF = np.concatenate([F[k].mean(0)[:configs[i].n_atoms] - configs[i].forces
                             for k, i in zip(counted, valid_ids[counted])
                             if configs[i].forces is not None])
        assert len(dF) == sum(configs[i].n_atoms for i in valid_ids[counted]
                              if i not in (4, 7))
        return {"energy_mae_mev_atom": 1e3 * np.mean(np.abs(dE)),
                "energy_rmse_mev_atom": 1e3 * np.sqrt(np.mean(dE**2)),
                "force_mae_mev_A": 1e3 * np.mean(np.abs(dF)),
                "force_rmse_mev_A": 1e3 * np.sqrt(np.mean(dF**2))}

    for key, keep in (("all", lambda i: True), ("without_outliers", lambda i: i not in (6, 11))):
        want = by_hand(keep)
        assert got[key]["n_configs"] == sum(map(keep, valid_ids))
        for name, value in want.items():
            np.testing.assert_allclose(got[key][name], value, rtol=1e-12)
    assert got["all"]["force_mae_mev_A"] != got["without_outliers"]["force_mae_mev_A"]


@pytest.mark.parametrize("cap", [8, 24, 10**6])
def test_predict_in_chunks_matches_each_configuration(configs, x64, monkeypatch, cap):
    """Whole-set and chunked (last chunk padded) predictions of a committee (members
    outermost, the batch as one system) equal each member on each unpadded configuration
    through the single-model path (``potential.evaluate``, its own neighbour list)."""
    from neuralil_fast.potential import evaluate_jit
    from neuralil_fast.training import loop

    model = tiny_model()
    data = pad_configurations(configs[:7], model.species, model.r_cut, "reference", np.float64)
    trainer = Trainer(model, data, None, TrainConfig(batch_size=2, backend="reference",
                                                     committee=2))
    params = trainer.init_state().params
    monkeypatch.setattr(loop, "PREDICT_ATOMS", cap * data.positions.shape[1] // 8)
    chunk = trainer.predict_chunk(data)
    assert chunk == max(2, min(7, cap // 8))
    E, F = trainer.predict(params, data)
    assert E.shape == (7, 2) and F.shape == (7, 2) + data.positions.shape[1:]
    for k, c in enumerate(configs[:7]):
        args = unpadded_args(model, c)
        for m in range(2):
            ref = evaluate_jit(model, member(params, m), *args, stress=False)
            np.testing.assert_allclose(E[k, m], float(ref["energy"]), rtol=1e-12)
            np.testing.assert_allclose(F[k, m, :c.n_atoms], np.asarray(ref["forces"]),
                                       rtol=1e-10, atol=1e-12)
            assert np.all(F[k, m, c.n_atoms:] == 0)


# --------------------------------------------------------------------------- CLI, checkpoints


def cli(args):
    from neuralil_fast.cli import main

    return main(["train", *map(str, args)])


COMMON = ["--species", "H", "O", "--widths", "8", "8", "--n-max", "2", "--r-cut", str(R_CUT),
          "--batch-size", "4", "--backend", "reference", "--no-progress", "--n-valid", "3"]


@pytest.fixture(scope="module")
def xyz(tmp_path_factory, configs):
    return write_extxyz(tmp_path_factory.mktemp("data") / "lj.extxyz", configs[:11])


def _params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


CRASHER = textwrap.dedent("""
    import os, signal, sys, tempfile
    import neuralil_fast.io as io
    crash_at = int(sys.argv[1])
    original = io._atomic_write_bytes
    seen = [0]
    def crashing(path, data):
        if str(path).endswith(".state"):
            seen[0] += 1
            if seen[0] == crash_at:
                # half of the new file is on disk when the process dies
                fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp",
                                           dir=path.parent)
                os.write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, data)
    io._atomic_write_bytes = crashing
    from neuralil_fast.cli import main
    sys.exit(main(["train"] + sys.argv[2:]))
""")


def test_kill_during_checkpoint_then_resume_is_bitwise(tmp_path, xyz):
    epochs = 4
    straight = tmp_path / "straight.nil"
    assert cli([xyz, "--out", straight, "--epochs", epochs, "--committee", 2, *COMMON]) == 0
    # killed while writing the state after epoch 3: the state of epoch 2 stays intact
    crashed = tmp_path / "crashed.nil"
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    proc = subprocess.run([sys.executable, str(script), "3", str(xyz), "--out", str(crashed),
                           "--epochs", str(epochs), "--committee", "2",
                           "--checkpoint-seconds", "0", *COMMON],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state_path = Path(str(crashed) + ".state")
    _, _, extra = load(state_path, with_extra=True)
    assert extra["training"]["epoch"] == 2
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the half-written temporary file of the killed write
    assert cli([xyz, "--out", crashed, "--epochs", epochs, "--committee", 2, "--resume",
                *COMMON]) == 0
    a = load(Path(str(straight) + ".state"), with_extra=True)
    b = load(state_path, with_extra=True)
    assert _params_equal(a[1], b[1])
    assert _params_equal(a[2]["training"]["best_params"], b[2]["training"]["best_params"])
    assert _params_equal(a[2]["training"]["opt_state"], b[2]["training"]["opt_state"])
    assert _params_equal(load(straight)[1], load(crashed)[1])
    # N/2 epochs, then --resume for the rest
    half = tmp_path / "half.nil"
    assert cli([xyz, "--out", half, "--epochs", epochs // 2, "--committee", 2, *COMMON]) == 0
    assert cli([xyz, "--out", half, "--epochs", epochs, "--committee", 2, "--resume",
                *COMMON]) == 0
    c = load(Path(str(half) + ".state"), with_extra=True)
    assert _params_equal(a[1], c[1])
    assert [h["train_loss"] for h in a[2]["training"]["history"]] == \
        [h["train_loss"] for h in c[2]["training"]["history"]]
    # resuming with other settings is refused
    assert cli([xyz, "--out", half, "--epochs", epochs + 1, "--committee", 2, "--resume",
                "--lr-peak", "0.02", *COMMON]) == 2


def test_cli_outputs_log_parity_and_committee_calculator(tmp_path, xyz, capsys):
    pytest.importorskip("matplotlib")

    from neuralil_fast.calculator import Calculator

    out, log, png = tmp_path / "c.nil", tmp_path / "log.json", tmp_path / "parity.png"
    assert cli([xyz, "--out", out, "--epochs", 2, "--committee", 3, "--log", log,
                "--parity", png, "--outliers", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                *COMMON]) == 0
    entries = json.loads(log.read_text())
    assert len(entries["epochs"]) == 2
    trained = sorted(set(range(11)) - set(entries["valid_ids"]))
    assert f"note: --outliers {trained} are training configurations" in capsys.readouterr().err
    first = entries["epochs"][0]
    for key in ("wall_time_s", "train_loss", "valid"):
        assert key in first
    assert {"energy_mae_mev_atom", "force_mae_mev_A"} <= set(first["valid"]["all"])
    assert first["valid"]["without_outliers"]["n_configs"] == 0
    assert png.stat().st_size > 1000
    model, params, k = load_any(out)
    assert k == 3
    c = lj_configs(1, seed=5)[0]
    atoms = Atoms(symbols=c.symbols, positions=c.positions, cell=c.cell, pbc=True)
    atoms.calc = Calculator(out, backend="reference")
    e = atoms.get_potential_energy()
    F = atoms.get_forces()
    de = atoms.calc.get_property("energy_uncertainty")
    dF = atoms.calc.get_property("forces_uncertainty")
    singles = []
    for i in range(3):
        a2 = atoms.copy()
        a2.calc = Calculator(model, member(params, i), backend="reference")
        singles.append((a2.get_potential_energy(), a2.get_forces()))
    E = np.array([s[0] for s in singles])
    Fs = np.stack([s[1] for s in singles])
    np.testing.assert_allclose(e, E.mean(), rtol=1e-6)
    np.testing.assert_allclose(de, E.std(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(F, Fs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dF, np.sqrt(np.mean(np.sum((Fs - Fs.mean(0)) ** 2, -1), 0)),
                               rtol=1e-4, atol=1e-8)
    assert de > 0
    # a single model has no uncertainty results; its path is unchanged
    single = tmp_path / "single.nil"
    from neuralil_fast.model import save

    save(single, model, member(params, 0))
    atoms.calc = Calculator(single, backend="reference")
    np.testing.assert_allclose(atoms.get_potential_energy(), E[0], rtol=1e-6)
    assert "energy_uncertainty" not in atoms.calc.results


def test_cli_size_groups_keep_each_set_in_its_groups(tmp_path, mixed_partly_labelled,
                                                     monkeypatch):
    """``train --size-groups 2`` builds each set in its size groups (never the whole set
    padded to the largest), writes the model and log that the padded sets give (the
    oracle: group_configurations swapped for pad_configurations) and the parity plot."""
    pytest.importorskip("matplotlib")
    from neuralil_fast.training import data

    path = write_extxyz(tmp_path / "mixed.extxyz", mixed_partly_labelled)
    built, real = [], data.group_configurations

    def spy(*args, **kw):
        built.append(real(*args, **kw))
        return built[-1]

    def padded(configs, species, r_cut, backend, dtype, max_groups, batch, progress):
        return data.pad_configurations(configs, species, r_cut, backend, dtype,
                                       progress=progress)

    outputs = []
    for name, swap in (("grouped", spy), ("padded", padded)):
        monkeypatch.setattr(data, "group_configurations", swap)
        out, log = tmp_path / f"{name}.nil", tmp_path / f"{name}.json"
        assert cli([path, "--out", out, "--epochs", 1, "--size-groups", 2, "--log", log,
                    "--parity", tmp_path / f"{name}.png", *COMMON]) == 0
        outputs.append((load(out)[1], json.loads(log.read_text())))
    assert [len(d.groups) for d in built] == [2, 2]          # training and validation sets
    assert built[0].parts[0].max_atoms < built[0].max_atoms
    (a, log_a), (b, log_b) = outputs
    assert _params_equal(a, b)
    assert log_a["final"]["valid"] == log_b["final"]["valid"]
    assert [e["valid"] for e in log_a["epochs"]] == [e["valid"] for e in log_b["epochs"]]
    assert (tmp_path / "grouped.png").stat().st_size > 1000


def test_ablation_options_build_the_right_model(tmp_path, xyz):
    out = tmp_path / "ab.nil"
    assert cli([xyz, "--out", out, "--epochs", 1, "--no-element-resolved", "--activation",
                "selu", "--energy-only", *COMMON]) == 0
    model, _ = load(out)
    assert model.element_resolved is False and model.activation == "selu"


def test_cli_trains_on_data_with_and_without_forces(tmp_path, configs, capsys):
    """Energy-only data trains with --energy-only (no force metrics, none made up); data
    where some configurations lack forces trains on both, saying how many lack them."""
    energy_only = write_extxyz(tmp_path / "e.extxyz", [_without_forces(c) for c in configs[:11]])
    out, log = tmp_path / "e.nil", tmp_path / "log.json"
    capsys.readouterr()
    assert cli([energy_only, "--out", out, "--epochs", 1, "--energy-only", "--log", log,
                *COMMON]) == 0
    assert "force MAE n/a;" in capsys.readouterr().out
    valid = json.loads(log.read_text())["final"]["valid"]["all"]
    assert valid["n_configs"] == 3 and "force_mae_mev_A" not in valid
    mixed = write_extxyz(tmp_path / "m.extxyz",
                         [c if k % 3 else _without_forces(c) for k, c in enumerate(configs[:11])])
    assert cli([mixed, "--out", out, "--epochs", 1, "--log", log, *COMMON]) == 0
    log = json.loads(log.read_text())
    lacking = [k for k in log["train_ids"] if k % 3 == 0]
    note = capsys.readouterr().err
    assert f"note: {len(lacking)} of 8 training and {4 - len(lacking)} of 3 validation" in note
    assert "force_mae_mev_A" in log["final"]["valid"]["all"]


def test_cli_species_energies_on_data_of_varying_composition(tmp_path, configs, capsys):
    """Per-species offsets of hundreds of eV: the fitted table takes them up (energy MAE
    under 1% of one common offset's after the same epoch), is saved with the model, is
    refitted after training on forces only, and a resumed run fits the same table."""
    data = write_extxyz(tmp_path / "off.extxyz", [_offset(c) for c in configs[:11]])
    mae, models = {}, {}
    for mode in ("auto", "none", "forces-only"):
        out, log = tmp_path / f"{mode}.nil", tmp_path / f"{mode}.json"
        extra = ["--forces-only"] if mode == "forces-only" else ["--species-energies", mode]
        assert cli([data, "--out", out, "--epochs", 1, "--log", log, *extra, *COMMON]) == 0
        mae[mode] = json.loads(log.read_text())["final"]["valid"]["all"]["energy_mae_mev_atom"]
        models[mode] = load(out)[0]
        err = capsys.readouterr().err
        assert ("species energies (eV/atom" in err) == (mode != "none")
        assert ("refitted after training on forces" in err) == (mode == "forces-only")
    assert mae["auto"] < 0.01 * mae["none"] and mae["forces-only"] < 0.01 * mae["none"], mae
    assert models["none"].species_energies is None
    table = np.asarray(models["auto"].species_energies)  # the LJ energies: a few eV at most
    np.testing.assert_allclose(table, [OFFSETS[s] for s in models["auto"].species], atol=5.0)
    assert models["forces-only"].species_energies != models["auto"].species_energies
    assert cli([data, "--out", tmp_path / "auto.nil", "--epochs", 2, "--resume",
                *COMMON]) == 0


def test_divergence_stops_the_run_and_keeps_the_best_model(tmp_path, xyz, monkeypatch, capsys):
    """A NaN learning rate from the fifth step (the first of epoch 3) makes the parameters
    NaN: the run stops after that epoch with a one-line error, the model file holds the
    best epoch's finite parameters, the state file its last finite checkpoint."""
    from neuralil_fast.training import loop

    lr = loop.learning_rate
    monkeypatch.setattr(loop, "learning_rate",
                        lambda cfg, step, *a: math.nan if step >= 4 else lr(cfg, step, *a))
    out, log = tmp_path / "d.nil", tmp_path / "d.json"
    with jax.debug_nans(False):  # the NaN is the point here
        rc = cli([xyz, "--out", out, "--epochs", 10, "--log", log, *COMMON])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    log = json.loads(log.read_text())
    best = log["final"]["best_epoch"]
    assert best in (1, 2) and len(log["epochs"]) == 2 and log["diverged"]["epoch"] == 3
    assert "training diverged in epoch 3 (mean training loss nan)" in err, err
    assert f"holds the model of epoch {best}" in err, err
    for path in (out, Path(str(out) + ".state")):
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(load(path)[1])), path


def test_core_repulsion_option_takes_the_training_closest_approach(tmp_path, xyz, configs):
    out, log = tmp_path / "core.nil", tmp_path / "log.json"
    assert cli([xyz, "--out", out, "--epochs", 1, "--core-repulsion", "--log", log,
                *COMMON]) == 0
    model, _ = load(out)
    train_ids = json.loads(log.read_text())["train_ids"]
    want = np.full((2, 2), R_CUT)
    for k in train_ids:    # brute force over the minimum images (all pairs < half the box)
        c = configs[k]

        dist = Atoms(c.symbols, positions=c.positions, cell=c.cell, pbc=True).get_all_distances(
            mic=True)
        sp = np.array([SPECIES.index(x) for x in c.symbols])
        for i in range(len(sp)):
            for j in range(len(sp)):
                if i != j:
                    want[sp[i], sp[j]] = min(want[sp[i], sp[j]], dist[i, j])
    np.testing.assert_allclose(np.asarray(model.core_repulsion), want, rtol=1e-6)
    # the same table on --resume (the state's model settings must match)
    assert cli([xyz, "--out", out, "--epochs", 2, "--core-repulsion", "--resume",
                *COMMON]) == 0


# --------------------------------------------------------------------------- bad input


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(c):
    return {"Energy": c.energy, "Positions": c.positions.tolist(), "Forces": c.forces.tolist(),
            "Cell-Size": np.diag(c.cell).tolist()}


def test_bad_input_fails_before_training(tmp_path, configs, capsys):
    same = [c for c in configs if c.n_atoms == configs[0].n_atoms][:3]
    seq = list(same[0].symbols)
    out = tmp_path / "never.nil"
    good = _jsonl(tmp_path / "good.jsonl", [_record(c) for c in same])

    def check(args, pattern):
        capsys.readouterr()
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert pattern in err, err
        assert not out.exists()

    recs = [_record(c) for c in same]
    recs[1]["Forces"][2][1] = float("nan")
    nan = tmp_path / "nan.jsonl"
    nan.write_text("".join(json.dumps(r).replace("NaN", "NaN") + "\n" for r in recs))
    common = ["--out", out, "--species", "H", "O", "--no-progress", "--n-valid", "1"]
    check([nan, "--species-sequence", *seq, *common], "NaN")
    check([good, "--species-sequence", *(seq + ["H"]), *common], "atoms")
    check([good, "--species-sequence", *seq, "--out", out, "--species", "H", "--no-progress"],
          "not among the model's species")
    check([good, "--species-sequence", *seq, *common[:-2], "--n-valid", "3"], "--n-valid")
    check([tmp_path / "missing.jsonl", "--species-sequence", *seq, *common], "does not exist")
    check([good, "--species-sequence", *seq, *common, "--outliers", str(len(same))],
          f"outside 0..{len(same) - 1}")
    one = _jsonl(tmp_path / "one.jsonl", [_record(same[0])])  # outliers index --valid's file
    check([good, "--species-sequence", *seq, *common, "--valid", one, "--outliers", "1"],
          "outside 0..0 (" + str(one))
    check([good, *common], "species_sequence")
    check([good, "--species-sequence", *seq, *common, "--resume"], "no training state")
    check([good, "--species-sequence", *seq, *common, "--checkpoint-seconds", "-1"],
          "--checkpoint-seconds")
    for flag in ("--state", "--log", "--parity"):
        check([good, "--species-sequence", *seq, *common, flag, tmp_path / "no" / "file"],
              f"{flag}: folder")
    no_forces = write_extxyz(tmp_path / "no_forces.extxyz", [_without_forces(c) for c in same])
    check([no_forces, *common], "carries no forces: train on energies with --energy-only")
    empty = tmp_path / "empty_frame.extxyz"  # an empty frame: its energy per atom is 0 / 0
    frames = [to_atoms(c) for c in same] + [Atoms(cell=same[0].cell, pbc=True)]
    frames[-1].calc = SinglePointCalculator(frames[-1], energy=0.0, forces=np.zeros((0, 3)))
    ase.io.write(empty, frames)
    check([empty, *common], "has no atoms")
    with pytest.raises(ValueError, match="configuration 1 has no atoms"):  # the API path
        pad_configurations([same[0], from_atoms(frames[-1])], ("H", "O"), 3.0, "reference")


def test_numba_training_gradient_matches_reference(configs, x64):
    """The jitted loss gradient through the numba kernels equals the reference one."""
    model = tiny_model()
    params = stack([model.init(jax.random.key(2), jnp.float64)])
    got = {}
    for backend in ("reference", "numba"):
        try:
            data = pad_configurations(configs[:4], model.species, model.r_cut, backend,
                                      np.float64)
            trainer = Trainer(model, data, None, TrainConfig(batch_size=4, backend=backend))
            f = jax.jit(jax.value_and_grad(
                lambda p: trainer._loss(p, trainer.train, jnp.arange(4), jnp.ones(4))[0]))
            got[backend] = f(params)
        except NotImplementedError as err:
            pytest.skip(f"numba backend not wired: {err}")
    (l1, g1), (l2, g2) = got["reference"], got["numba"]
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_compiler_options_change_no_result(configs, dtype, x64):
    """The training step compiled with its XLA:CPU options equals the one with XLA's defaults.

    The options only move reductions out of YNNPACK fusions (summation order: float
    rounding, no more); they stay scoped to the step's jit.
    """
    from neuralil_fast.training import loop

    if jax.default_backend() != "cpu":
        pytest.skip("the options apply to XLA:CPU only")
    opts = loop.step_compiler_options()
    assert opts == loop._CPU_STEP_OPTIONS, "this JAX rejects the step's XLA option"
    model = tiny_model(widths=(8, 8, 8))  # two LayerNorms
    data = pad_configurations(configs[:4], model.species, model.r_cut, "reference",
                              getattr(np, dtype))
    trainer = Trainer(model, data, None, TrainConfig(batch_size=4, backend="reference",
                                                     committee=2))
    state = trainer.init_state()
    args = (state.params, state.opt_state, trainer.train, jnp.arange(4), jnp.ones(4, dtype),
            jnp.asarray(1e-3, dtype))
    kw = dict(model=model, backend="reference", loss=trainer.cfg.loss, opt=trainer._opt_key)
    plain = jax.jit(loop._train_step, static_argnames=tuple(kw))(*args, **kw)
    tuned = trainer._step(*args[:6])
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(tuned)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=rtol * 1e-2)


def test_learning_rate_schedules():
    from neuralil_fast.training.loop import learning_rate

    ep = TrainConfig(lr_start=1e-3, lr_peak=1e-2, lr_end=1e-5)
    # per epoch (10 steps): starts at lr_start, peaks at 30%, ends near lr_end, repeats
    lrs = [learning_rate(ep, s, 10, None) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-2)
    assert lrs[9] < 1e-3 and lrs[10:] == lrs[:10]
    run = TrainConfig(lr_start=1e-3, lr_peak=1e-2, lr_end=1e-5, schedule="run", warmup_epochs=2)
    lrs = [learning_rate(run, s, 10, 120) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[20] == pytest.approx(1e-2)
    assert np.all(np.diff(lrs[:21]) > 0) and np.all(np.diff(lrs[20:120]) < 0)
    assert lrs[119] == pytest.approx(1e-5) and lrs[129] == pytest.approx(1e-5)
    # before the budget is planned the LR holds the peak after the warm-up
    assert learning_rate(run, 50, 10, None) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="epochs or max_minutes"):
        TrainConfig(epochs=None)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1e-4)


def test_run_schedule_budget_plan_and_resume(tmp_path, xyz):
    # planned from a time budget: stored in the state and kept on resume
    out = tmp_path / "budget.nil"
    assert cli([xyz, "--out", out, "--epochs", 5, "--max-minutes", 10, "--schedule", "run",
                "--warmup-epochs", 1, *COMMON]) == 0
    _, _, extra = load(Path(str(out) + ".state"), with_extra=True)
    t = extra["training"]
    steps_per_epoch = t["step"] // t["epoch"]
    assert t["epoch"] == 5 and t["planned_steps"] == 5 * steps_per_epoch  # epochs cap the plan
    assert t["history"][-1]["lr"] == pytest.approx(1e-5)
    # planned from --epochs: 2 + resume to 4 equals 4 straight, bit for bit
    straight, half = tmp_path / "s.nil", tmp_path / "h.nil"
    assert cli([xyz, "--out", straight, "--epochs", 4, "--schedule", "run", *COMMON]) == 0
    assert cli([xyz, "--out", half, "--epochs", 2, "--schedule", "run", *COMMON]) == 0
    a = load(Path(str(straight) + ".state"), with_extra=True)
    b = load(Path(str(half) + ".state"), with_extra=True)
    assert b[2]["training"]["planned_steps"] == b[2]["training"]["step"]
    # a resumed run keeps its plan: the curve of a 2-epoch run does not become a 4-epoch one
    assert cli([xyz, "--out", half, "--epochs", 4, "--schedule", "run", "--resume",
                *COMMON]) == 0
    c = load(Path(str(half) + ".state"), with_extra=True)
    assert c[2]["training"]["planned_steps"] == b[2]["training"]["planned_steps"]
    assert [h["lr"] for h in c[2]["training"]["history"][2:]] == [1e-5, 1e-5]
    assert not _params_equal(a[1], c[1])


def test_parameter_average_follows_the_raw_trajectory(configs):
    model = tiny_model()
    data = pad_configurations(configs[:8], model.species, model.r_cut, "reference")
    raw_cfg = TrainConfig(epochs=5, batch_size=8, backend="reference", committee=2)
    raw = Trainer(model, data, None, raw_cfg)
    state = raw.init_state()
    trajectory = [state.params]
    for _ in range(5):               # one step per epoch: the parameters after each step
        raw.run_epoch(state)
        trajectory.append(state.params)
    expected = jax.tree.map(lambda a: np.asarray(a, np.float64), trajectory[0])
    for t, p in enumerate(trajectory[1:], start=1):
        d = ema_decay(0.9, t)
        expected = jax.tree.map(lambda a, b: d * a + (1 - d) * np.asarray(b, np.float64),
                                expected, p)
    avg = Trainer(model, data, None, TrainConfig(epochs=5, batch_size=8, backend="reference",
                                                 committee=2, ema=0.9))
    st = avg.fit(avg.init_state())
    assert _params_equal(st.params, trajectory[-1])   # the average does not steer training
    for a, b in zip(jax.tree.leaves(st.ema_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6)
    assert not _params_equal(st.ema_params, st.params)
    assert _params_equal(st.best_params, st.ema_params)  # no validation: the last average
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(ema=1.0)


def test_resume_continues_the_parameter_average_bitwise(tmp_path, xyz):
    straight, half = tmp_path / "s.nil", tmp_path / "h.nil"
    flags = ["--committee", 2, "--ema", 0.8, *COMMON]
    assert cli([xyz, "--out", straight, "--epochs", 4, *flags]) == 0
    assert cli([xyz, "--out", half, "--epochs", 2, *flags]) == 0
    # an averaged state does not resume a run without the average, nor the reverse
    assert cli([xyz, "--out", half, "--epochs", 4, "--resume", "--committee", 2,
                *COMMON]) == 2
    plain = tmp_path / "p.nil"
    assert cli([xyz, "--out", plain, "--epochs", 1, "--committee", 2, *COMMON]) == 0
    assert cli([xyz, "--out", plain, "--epochs", 2, "--resume", *flags]) == 2
    assert cli([xyz, "--out", half, "--epochs", 4, "--resume", *flags]) == 0
    a = load(Path(str(straight) + ".state"), with_extra=True)
    b = load(Path(str(half) + ".state"), with_extra=True)
    assert _params_equal(a[1], b[1])
    assert _params_equal(a[2]["training"]["ema_params"], b[2]["training"]["ema_params"])
    assert _params_equal(a[2]["training"]["best_params"], b[2]["training"]["best_params"])
    # keep-best picked among the averages: the saved model is one of them, not the raw one
    assert _params_equal(load(straight)[1], load(half)[1])
    assert not _params_equal(load(straight)[1], a[1])
