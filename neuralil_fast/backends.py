"""The one place where ``backend=`` is resolved.

"reference": pure JAX (the oracle, every derivative).
"numba": hand-written CPU kernels called through the XLA FFI.
"triton": hand-written GPU kernels called through jax-triton.
"auto": triton when a GPU and jax-triton are present, else numba (else reference).
"""
from __future__ import annotations

import functools
import importlib.util

BACKENDS = ("reference", "numba", "triton", "auto")


@functools.cache
def _has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@functools.cache
def triton_available() -> bool:
    return (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("jax_triton") is not None
        and _has_gpu()
    )


def resolve_backend(backend: str) -> str:
    """Map a user's ``backend`` string to a concrete one; ValueError if unknown or unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        from .kernels_api import numba_available

        if triton_available():
            return "triton"
        return "numba" if numba_available() else "reference"
    if backend == "triton" and not triton_available():
        raise ValueError(
            "backend 'triton' needs a CUDA GPU visible to JAX plus the triton and jax-triton "
            "packages (pip install 'neuralil_fast[gpu]')"
        )
    return backend
