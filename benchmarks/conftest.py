"""Shared by the benchmark modules."""
from __future__ import annotations


def print_uncaptured(request, lines) -> None:
    """Print a summary at module teardown, where pytest would otherwise capture it."""
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n".join(lines), flush=True)
    else:
        print("\n".join(lines))
