"""Shared by the benchmark modules."""
from __future__ import annotations

import time

import pytest


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
