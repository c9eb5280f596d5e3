"""A stand-in for ``jax_triton`` that runs the Triton kernels in the interpreter.

jax-triton lowers ``triton_call`` to a CUDA custom call, so without a GPU it cannot
run.  This stand-in keeps its documented calling convention -- the kernel receives
the positional ``args`` (arrays become pointers, Python scalars stay scalars) and
then one pointer per ``out_shape`` entry; metaparams are constexprs; outputs not
listed in ``zeroed_outputs`` start uninitialised (here: NaN, or -7 for integers,
so a missing write shows) -- and runs the kernel through ``jax.pure_callback`` on
torch CPU tensors, so the project's jax-side wiring (plans, launch arguments,
custom_vjp, batching, jit) is exercised end to end.  What it cannot check is
jax-triton's own lowering, which needs a GPU.

Test modules call :func:`require` first: it sets ``TRITON_INTERPRET=1`` (before
triton is imported) where there is no CUDA device, or skips the module.
"""
from __future__ import annotations

import collections
import os
import sys
import types

import numpy as np

from neuralil_fast.kernels.ffi import pure_callback_64

_SCALARS = (bool, int, float)
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches run


def require():
    """Skip the calling test module unless the Triton kernels can run; True with CUDA.

    Without a CUDA device the kernels run in Triton's interpreter on torch CPU tensors,
    which must be switched on before triton is first imported.
    """
    import pytest

    torch = pytest.importorskip(
        "torch",
        reason="torch is needed to launch the Triton kernels (pin the CPU build torch==2.13.0)")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run",
                    allow_module_level=True)
    return cuda


def triton_call(*args, kernel, out_shape, grid, num_warps=4, zeroed_outputs=(), **meta):
    import torch

    single = not isinstance(out_shape, (tuple, list))
    shapes = [out_shape] if single else list(out_shape)
    arrays = [a for a in args if not isinstance(a, _SCALARS)]
    if callable(grid):
        grid = grid(meta)

    def host(*values):
        it = iter(values)
        ins = [a if isinstance(a, _SCALARS) else torch.from_numpy(np.array(next(it)))
               for a in args]
        outs = []
        for k, s in enumerate(shapes):
            dt = np.dtype(s.dtype)
            garbage = np.nan if np.issubdtype(dt, np.floating) else -7
            outs.append(torch.from_numpy(np.full(s.shape, 0 if k in zeroed_outputs else garbage,
                                                 dt)))
        kernel[tuple(grid)](*ins, *outs, num_warps=num_warps, **meta)
        LAUNCHES[getattr(kernel, "__name__", None) or str(kernel)] += 1
        return tuple(o.numpy() for o in outs)

    # the library's own callback helper: float64 stays float64 on XLA's threads
    res = pure_callback_64(host, shapes, *arrays)
    return res[0] if single else tuple(res)


def install(monkeypatch):
    """Make ``backend="triton"`` resolvable and route jax_triton to the interpreter."""
    from neuralil_fast import backends

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(backends, "triton_available", lambda: True)
