"""Hand-written kernels, importable as ``neuralil_fast.kernels``.

``cpu/`` holds numba kernels (registered with XLA through ``ffi.py``),
``gpu/`` holds Triton kernels (launched through jax-triton).  Nothing here
knows about flax, ASE or the model: kernels take arrays and return arrays.
"""
