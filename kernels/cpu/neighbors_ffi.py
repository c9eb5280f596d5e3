"""XLA-FFI entry point of the numba cell-list search (``impl(*inputs, *outputs)`` style).

Inputs: positions (N, 3) float, cell (3, 3) float, pbc (3,) bool, r_cut (1,) float.
Outputs: centers (capacity,) int32, neighbors (capacity,) int32, shifts (capacity, 3)
int32, count (1,) int32 = the true number of pairs (> capacity: overflow, the caller
reallocates) or a negative error code of :mod:`.neighbors` (then all rows are padding).
"""
import numpy as np
from numba import njit

from .neighbors import count_and_fill


@njit(cache=True)
def build_pairs(positions, cell, pbc, r_cut, centers_out, neighbors_out, shifts_out, count_out):
    n_atoms = positions.shape[0]
    capacity = centers_out.shape[0]
    n = count_and_fill(positions, cell.astype(np.float64), pbc, np.float64(r_cut[0]), capacity,
                       centers_out, neighbors_out, shifts_out)
    if n < 0:
        # Invalid input: no pair was written; leave well-defined padding behind.
        for p in range(capacity):
            centers_out[p] = n_atoms
            neighbors_out[p] = n_atoms
            shifts_out[p, 0] = 0
            shifts_out[p, 1] = 0
            shifts_out[p, 2] = 0
    count_out[0] = n
