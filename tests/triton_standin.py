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

Import this module only after ``TRITON_INTERPRET=1`` is set (before triton).
"""
from __future__ import annotations

import sys
import types

import jax
import numpy as np

_SCALARS = (bool, int, float)


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
        return tuple(_wire(o.numpy()) for o in outs)

    res = jax.pure_callback(host, tuple(_wire_shape(s) for s in shapes), *arrays)
    res = [_unwire(r, s) for r, s in zip(res, shapes)]
    return res[0] if single else tuple(res)


# 64-bit results cross the callback as uint32 pairs: JAX canonicalises a callback's
# results with the x64 setting of the thread that runs it, and a scoped
# ``enable_x64`` does not reach XLA's threads (a float64 result would come back float32).
def _wide(dtype) -> bool:
    return np.dtype(dtype).itemsize == 8


def _wire(a):
    return a.view(np.uint32).reshape(a.shape + (2,)) if _wide(a.dtype) else a


def _wire_shape(s):
    return jax.ShapeDtypeStruct(s.shape + (2,), np.uint32) if _wide(s.dtype) else \
        jax.ShapeDtypeStruct(s.shape, s.dtype)


def _unwire(r, s):
    return jax.lax.bitcast_convert_type(r, s.dtype) if _wide(s.dtype) else r


def install(monkeypatch):
    """Make ``backend="triton"`` resolvable and route jax_triton to the interpreter."""
    from neuralil_fast import backends

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(backends, "triton_available", lambda: True)
