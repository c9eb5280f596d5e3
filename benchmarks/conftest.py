"""Shared by the benchmark modules."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

# the EAN data in ../shared beside the checkout (absent from a user's clone)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ean"
EAN = SHARED / "ean_dft_60.jsonl"  # the DFT configurations


def timed_pedantic(benchmark, fn, rounds, warmup_rounds, times=None):
    """``benchmark.pedantic`` of ``fn`` with one call per round: (last result, min seconds).

    ``times``: an optional list that receives every call's seconds, warm-up rounds first.
    """
    times = [] if times is None else times

    def timed():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        return out

    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return out, min(times)


def print_uncaptured(request, lines) -> None:
    """Print a summary at module teardown, where pytest would otherwise capture it."""
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n".join(lines), flush=True)
    else:
        print("\n".join(lines))


def module_summary(results: dict, lines):
    """An autouse module fixture printing ``lines()`` (a list of str) after the module's
    benchmarks, when ``results`` holds any."""
    @pytest.fixture(scope="module", autouse=True)
    def _summary(request):
        yield
        if results:
            print_uncaptured(request, [""] + lines())

    return _summary


def ean_training_batch():
    """The training benchmark's batch: the first 8 EAN configurations (225 atoms each)."""
    from neuralil_fast.io import ean_species_sequence, read_dataset

    return read_dataset(EAN, ean_species_sequence(15))[:8]


def training_step(configurations, backend: str, committee: int):
    """The training benchmark's step: ``(trainer, step, inputs)``.

    One jitted AdamW step of the article's model (float32) on ``configurations`` as one
    batch (all indices, unit weights, LR 1e-3), taken once from the initial state (waited
    for); ``step()`` repeats the step after it (unblocked); ``inputs`` are its arguments,
    for lowering.  Raises NotImplementedError where ``backend`` is not wired.
    """
    import jax
    import jax.numpy as jnp

    from neuralil_fast.model import NeuralIL
    from neuralil_fast.training.data import pad_configurations
    from neuralil_fast.training.loop import TrainConfig, Trainer

    model = NeuralIL(species=("C", "H", "N", "O"))
    n = len(configurations)
    data = pad_configurations(configurations, model.species, model.r_cut, backend)
    trainer = Trainer(model, data, None, TrainConfig(batch_size=n, backend=backend,
                                                     committee=committee, fit_offset=False))
    state = trainer.init_state()
    args = (jnp.arange(n, dtype=jnp.int32), jnp.ones(n, jnp.float32),
            jnp.asarray(1e-3, jnp.float32))
    params, opt = trainer._step(state.params, state.opt_state, trainer.train, *args)[:2]
    params = jax.block_until_ready(params)

    def step():
        return trainer._step(params, opt, trainer.train, *args)

    return trainer, step, (params, opt, trainer.train) + args
