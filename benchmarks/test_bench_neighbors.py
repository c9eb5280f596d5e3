"""Neighbour-list build time: numba cell list vs vesin, matscipy and ASE.

Run::

    /work/venv/bin/pytest benchmarks/test_bench_neighbors.py --benchmark-enable \
        --benchmark-columns=min,mean,rounds --benchmark-sort=name

Systems: N = 10^3 .. 10^6 random atoms in a cubic periodic box at the EAN-like
density 0.1 atoms/A^3, r_cut = 3.5 and 5 A, full ``ijS`` list (both i->j and
j->i, with image shifts) from every library.  Benchmarks are grouped by
(N, r_cut).  At the end a summary table is printed with ns/atom, pairs/atom
and, for the numba list, the peak memory per atom (output arrays + bins and
sorted copies) and its first call's time: from 32 MiB of output up (10^5 atoms)
the numba list recycles its output buffers once the arrays of an earlier build
are gone, so later rounds skip the page faults of fresh memory (the heap does the
same for the smaller sizes and for every library); the first call shows the cost
without.
"""
from __future__ import annotations


import numpy as np
import pytest
from conftest import module_summary, timed_pedantic

from neuralil_fast.kernels.cpu import neighbors as nbm

DENSITY = 0.1
SIZES = [10**3, 10**4, 10**5, 10**6]
R_CUTS = [3.5, 5.0]
LIBS = ["numba", "vesin", "matscipy", "ase"]
ROUNDS = {10**3: 20, 10**4: 10, 10**5: 3, 10**6: 3}

_RESULTS: dict[tuple, dict] = {}


def _system(n, seed=0):
    box = (n / DENSITY) ** (1.0 / 3.0)
    rng = np.random.default_rng(seed)
    return rng.random((n, 3)) * box, np.eye(3) * box


def _numba_memory(positions, cell, pbc, r_cut):
    """Peak bytes of the numba build: max(binning phase, search phase).

    Binning (``_plan``) temporaries: fractional coords (24 B/atom), wrap
    shifts (12), bin ids (8), bin fill cursors (8/bin).  Persistent state:
    sorted wrapped coords (24), sorted shifts (12), permutation (8), bin starts
    (8/bin); then counts (8/atom) and CSR offsets (8/atom); output 20 B/pair.
    """
    code, state, offsets = nbm.search_count(positions, cell, pbc, r_cut)
    assert code == 0
    n = len(positions)
    nbins = int(np.prod(state[0]))
    persistent = sum(a.nbytes for a in state if isinstance(a, np.ndarray))
    plan_tmp = n * (24 + 12 + 8) + 8 * nbins
    search = offsets.nbytes + 8 * n
    out = int(offsets[-1]) * (4 + 4 + 12)
    return max(persistent + plan_tmp, persistent + search + out)


def _runner(lib, positions, cell, r_cut):
    pbc = np.array([True, True, True])
    if lib == "numba":
        return lambda: nbm.neighbor_pairs_numba(positions, cell, pbc, r_cut)
    if lib == "vesin":
        vesin = pytest.importorskip("vesin", reason="vesin not installed")
        nl = vesin.NeighborList(cutoff=r_cut, full_list=True)
        return lambda: nl.compute(points=positions, box=cell, periodic=True,
                                  quantities="ijS")
    if lib == "matscipy":
        mn = pytest.importorskip("matscipy.neighbours",
                                 reason="matscipy not installed")
        return lambda: mn.neighbour_list("ijS", positions=positions, cell=cell,
                                         pbc=pbc, cutoff=r_cut)
    if lib == "ase":
        ase = pytest.importorskip("ase", reason="ase not installed")
        from ase.neighborlist import neighbor_list

        atoms = ase.Atoms(positions=positions, cell=cell, pbc=True)
        return lambda: neighbor_list("ijS", atoms, r_cut)
    raise ValueError(lib)


def _summary_lines():
    lines = []
    write = lines.append
    write("neighbour-list build, min time per atom (ns/atom); "
          "numba memory = peak bytes/atom (output + bins); numba 1st = its first call "
          "(ns/atom, fresh output pages)")
    hdr = (f"{'N':>8} {'r_cut':>5} {'pairs/atom':>10} " +
           " ".join(f"{lib:>10}" for lib in LIBS) + f" {'numba/vesin':>11}"
           f" {'numba B/atom':>12} {'numba 1st':>10}")
    write(hdr)
    for n in SIZES:
        for rc in R_CUTS:
            row = {lib: _RESULTS.get((lib, n, rc)) for lib in LIBS}
            if not any(row.values()):
                continue
            ppa = next((r["pairs"] / n for r in row.values() if r), float("nan"))
            cells = " ".join(
                f"{row[lib]['ns_per_atom']:10.0f}" if row[lib] else f"{'-':>10}"
                for lib in LIBS
            )
            ratio = (row["numba"]["ns_per_atom"] / row["vesin"]["ns_per_atom"]
                     if row["numba"] and row["vesin"] else float("nan"))
            mem = row["numba"]["bytes_per_atom"] if row["numba"] else float("nan")
            first = row["numba"]["first_call_ns_per_atom"] if row["numba"] else float("nan")
            write(f"{n:>8} {rc:>5} {ppa:>10.1f} {cells} {ratio:>11.2f} {mem:>12.0f}"
                  f" {first:>10.0f}")
    return lines


_summary = module_summary(_RESULTS, _summary_lines)


@pytest.mark.parametrize("r_cut", R_CUTS, ids=lambda r: f"rc{r}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("lib", LIBS)
def test_neighbor_build(benchmark, lib, n, r_cut):
    if lib == "ase" and n > 10**5:
        pytest.skip("ASE's pure-numpy neighbour list needs minutes and tens of "
                    "GB (dense max_atoms_per_bin^2 pair buffers) at 10^6 atoms")
    positions, cell = _system(n)
    fn = _runner(lib, positions, cell, r_cut)
    benchmark.group = f"N={n:>7} r_cut={r_cut}"
    if lib == "numba":
        nbm.neighbor_pairs_numba(positions[:64], cell, True, r_cut)  # JIT
    rounds = 1 if (lib == "ase" and n >= 10**5) else ROUNDS[n]
    warmup = 1 if n <= 10**4 else 0
    if lib == "numba" and n > 10**4:
        # two calls before the timed ones: from then on each call finds a recycled output
        # buffer (the previous round's result is still alive while the next one runs, so
        # the first two calls both get fresh pages); the first call is reported apart
        warmup, rounds = 2, rounds + 2
    times = []
    out, best = timed_pedantic(benchmark, fn, rounds, warmup_rounds=warmup, times=times)
    pairs = len(out[0])
    del out
    info = {"pairs": pairs, "ns_per_atom": best * 1e9 / n}
    if lib == "numba":
        # the first call in this process for this size: its output buffers are fresh
        # pages (later calls recycle them, kernels/cpu/neighbors._pooled_raw)
        info["first_call_ns_per_atom"] = times[0] * 1e9 / n
        info["bytes_per_atom"] = _numba_memory(
            positions, cell, np.array([True] * 3), r_cut) / n
    benchmark.extra_info.update(info)
    _RESULTS[(lib, n, r_cut)] = info
