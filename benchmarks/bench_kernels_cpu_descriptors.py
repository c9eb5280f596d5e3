"""Timing of the numba descriptor kernels (kernels/cpu/descriptors.py).

Plain script: ``python benchmarks/bench_kernels_cpu_descriptors.py [--repeat R] [--threads T]``.
EAN configuration 0 (225 atoms) and its 2x2x2 replica (1800 atoms), float32 and
float64; forward, vjp, jvp.  Prints the best time over R runs (ms), the
flop-count-based GFLOP/s (flops counted analytically, see
``descriptors.flop_counts``) and that rate as a fraction of the float32 peak
of this CPU (2 cores x 2.6 GHz x 32 flop/cycle = 166 GFLOP/s; with --threads 1 the
percentage is still of the 2-core peak).  The first call of each kernel compiles it
(or loads numba's cache) and is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from conftest import EAN as EAN_FILE

from neuralil_fast.kernels.cpu import descriptors as K
from neuralil_fast.neighbors import neighbor_pairs_reference

PEAK_F32 = 2 * 2.6e9 * 32


def ean_atoms():
    import ase

    with open(EAN_FILE) as f:
        conf = json.loads(f.readline())
    symbols = (["N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H"] * 15 + ["N", "O", "O", "O"] * 15)
    return ase.Atoms(symbols, positions=conf["Positions"], cell=np.diag(conf["Cell-Size"]), pbc=True)


def pair_inputs(atoms, r_cut, dtype):
    order = ("C", "H", "N", "O")
    sp = np.array([order.index(s) for s in atoms.get_chemical_symbols()], np.int32)
    pos = atoms.get_positions()
    cell = np.asarray(atoms.get_cell())
    i, j, S = neighbor_pairs_reference(pos, cell, atoms.pbc, r_cut)
    d = np.ascontiguousarray(pos[j] + S @ cell - pos[i], dtype)
    return d, K.offsets_from_centers(i, len(atoms)), sp[j].astype(np.int32)


def best_of(f, repeat):
    f()  # compile / warm
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sizes", default="1,2", help="replicas per direction, e.g. 1,2")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    args = ap.parse_args()
    if not os.path.exists(EAN_FILE):
        raise SystemExit(f"{EAN_FILE} not found")
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    base = ean_atoms()
    r_cut, n_max, n_species = 3.5, 4, 4
    for dt, name in ((np.float32, "float32 (polynomial radial)"), (np.float64, "float64 (Bessel)")):
        fl = K.flop_counts_of(K.make_tables(n_max, r_cut, n_species, dt))
        print(f"{name} flops per pair/centre: "
              + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in fl.items()))
    print(f"numba threads: {numba.get_num_threads()}")
    print(f"{'atoms':>6} {'pairs':>7} {'dtype':>7} {'kernel':>8} {'best ms':>9} {'median ms':>10}"
          f" {'GFLOP/s':>8} {'% f32 peak':>10}")
    for rep in (int(s) for s in args.sizes.split(",")):
        atoms = base.repeat((rep, rep, rep))
        for dtype in (np.float32, np.float64):
            d, off, sp = pair_inputs(atoms, r_cut, dtype)
            N, P = len(off) - 1, len(d)
            tab = K.make_tables(n_max, r_cut, n_species, dtype)
            fl = K.flop_counts_of(tab)  # float32: the polynomial radial path (see make_tables)
            rng = np.random.default_rng(0)
            X, A = K.forward(d, off, sp, tab)
            Xb = rng.normal(size=(1,) + X.shape).astype(dtype)  # one cotangent
            dd = rng.normal(size=(1,) + d.shape).astype(dtype)
            d_bar = np.empty_like(dd)
            X_dot = np.empty_like(Xb)
            runs = {
                "forward": lambda: K.descriptors_fwd(d, off, sp, *tab, X, A),
                "vjp": lambda: K.descriptors_vjp(d, off, sp, *tab, A, Xb, d_bar),
                "jvp": lambda: K.descriptors_jvp(d, off, sp, *tab, A, dd, X_dot),
            }
            for name, f in runs.items():
                best, med = best_of(f, args.repeat)
                flops = fl[name][0] * P + fl[name][1] * N
                gf = flops / best / 1e9
                print(f"{N:>6} {P:>7} {np.dtype(dtype).name:>7} {name:>8} {best * 1e3:>9.3f}"
                      f" {med * 1e3:>10.3f} {gf:>8.2f} {100 * gf * 1e9 / PEAK_F32:>9.1f}%")


if __name__ == "__main__":
    main()
