"""Energy+force training steps per second: a batch of 8 EAN configurations (225 atoms each).

Run::

    /work/venv/bin/pytest benchmarks/test_bench_training.py --benchmark-enable \
        --benchmark-columns=min,mean,rounds

One jitted AdamW step (forward, forces, force+energy log-cosh loss, its parameter
gradient, update) of the article's model (widths 64-32-16-16-16, n_max 4, r_cut
3.5 Å, Morse term) in float32, ``backend="numba"`` next to ``backend="reference"``,
committee sizes 1, 4 and 8 (descriptors shared by the members).  The EAN data lives in
../shared (skipped with a reason where it is absent); the numba column is skipped
while its kernels raise NotImplementedError.
"""
from __future__ import annotations

import jax
import pytest
from conftest import EAN, ean_training_batch, training_step

_RESULTS: dict[tuple, float] = {}


@pytest.fixture(scope="module")
def ean_batch():
    if not EAN.is_file():
        pytest.skip(f"EAN data {EAN} is absent (../shared beside the checkout)")
    return ean_training_batch()


@pytest.mark.parametrize("committee", [1, 4, 8])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_training_step(benchmark, ean_batch, backend, committee):
    try:
        _, step_after, _ = training_step(ean_batch, backend, committee)
    except NotImplementedError as err:
        pytest.skip(f"backend {backend!r} is not wired yet: {err}")

    def step():
        jax.block_until_ready(step_after())

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        rate = 1.0 / benchmark.stats.stats.mean
        benchmark.extra_info["steps_per_second"] = rate
        benchmark.extra_info["configs_per_second"] = 8 * rate
        _RESULTS[(backend, committee)] = rate


def teardown_module(module):
    if _RESULTS:
        print("\ntraining steps/s (batch of 8 EAN configurations, float32):")
        for (backend, k), rate in sorted(_RESULTS.items()):
            print(f"  {backend:10s} committee {k}: {rate:7.2f} steps/s "
                  f"({8 * rate:7.1f} configurations/s)")
