"""The work-item scheduler of the numba kernels (kernels/cpu/parallel.py)."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from neuralil_fast.kernels.cpu.parallel import claim, num_threads


@njit(parallel=True)
def _run(n_items, spin):
    """Items claimed by the workers: done[item] counts how often it was done, by[item] the
    worker that did it.  Worker w's items take spin[w] more steps each (a slow core)."""
    n_w = max(1, min(n_items, num_threads()))
    counter = np.full(1, n_w, np.int64)
    done = np.zeros(n_items, np.int64)
    by = np.full(n_items, -1, np.int64)
    for w in prange(n_w):
        ch = np.int64(w)
        while ch < n_items:
            acc = 0.0
            for k in range(spin[w]):
                acc += np.sqrt(k + 1.0)
            done[ch] += 1 if acc >= 0.0 else 2
            by[ch] = w
            ch = claim(counter)
    return done, by, n_w


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_items", [1, 2, 3, 50, 1000])
def test_every_item_once(threads, n_items):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba has {numba.config.NUMBA_NUM_THREADS} thread(s)")
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        done, by, n_w = _run(n_items, np.zeros(threads, np.int64))
    finally:
        numba.set_num_threads(old)
    assert n_w == min(threads, n_items)
    np.testing.assert_array_equal(done, 1)
    assert set(by) == set(range(n_w))


def test_slow_worker_does_fewer_items():
    """Dynamic, not static: a worker whose items take 50x longer does far fewer of them."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        done, by, n_w = _run(200, np.array([200_000, 4_000], np.int64))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(done, 1)
    assert n_w == 2
    assert np.sum(by == 0) < np.sum(by == 1) / 5
