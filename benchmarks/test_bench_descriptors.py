"""Descriptors with gradients and energy + forces: numba kernels vs pure JAX vs DScribe.

Run (all sizes; the lead's full benchmark)::

    /work/venv/bin/pytest benchmarks/test_bench_descriptors.py --benchmark-enable \
        --benchmark-columns=min,mean,rounds --benchmark-sort=name

Only the 225-atom box: add ``-k N225``; one thread: prefix
``taskset -c 1 env NUMBA_NUM_THREADS=1``.

Structures: the EAN box ``EAN_md_initial.gro`` (225 atoms, 12.9 Å cubic, periodic)
from ../shared and its replicas 2x2x2 (1800), 4x4x4 (14 400) and 8x8x8 (115 200
atoms); test ids ``N225`` .. ``N115200``.  The neighbour list (numba cell list,
r_cut 3.5 Å, about 17 pairs per atom) is built once per size, outside the timing,
and the same pairs feed both backends.  Everything is float32 with JAX's x64 off
(as ``nf.Calculator(dtype="float32")``); one round = one call of a jitted function,
compiled before timing, result blocked on.

* ``test_descriptors_fwd_bwd[backend-N]``: the spherical-Bessel descriptors
  (C, H, N, O, r_cut 3.5, n_max 4: 150 features) from positions through the pair
  displacements, then the VJP of a fixed random cotangent back to the positions
  (what a force evaluation needs), ``backend="numba"`` vs ``"reference"`` (pure JAX).
* ``test_energy_forces[backend-N]``: energy + forces of the shared NeuralIL+Morse
  model (``potential.evaluate_jit``, ``stress=False``), numba vs reference.
* ``test_dscribe_soap[method-N]``: DScribe 2.1 SOAP (species C, H, N, O, r_cut 3.5,
  n_max 4, l_max 4, GTO radial basis; 680 features) with its derivatives,
  ``soap.derivatives(atoms, method=..., return_descriptor=True)``, float64 (its
  internal precision), single process (n_jobs=1):

  - ``analytical``: ``periodic=False`` -- DScribe 2.1 refuses analytical
    derivatives for periodic systems ("Analytical derivatives currently not
    available for periodic systems."), so the box is treated as an isolated
    cluster: atoms near the faces have fewer neighbours than in the periodic
    problem (less work, an optimistic time for DScribe);
  - ``numerical``: ``periodic=True`` -- the same periodic problem as ours, by
    central finite differences (the only derivatives DScribe has for it).

  DScribe returns the full Jacobian, a dense (N, N, 3, 680) float64 array, plus
  three (N, N, 4, 4, 25) float64 work arrays for the analytical method: O(N^2)
  memory, and at least O(N^2) time to zero and fill it.  It has no VJP interface, so this is what a user gets; sizes
  whose arrays would not fit in half the RAM or whose estimated time exceeds
  ~2 minutes per round are skipped with the estimate in the reason.

Skipped: the reference backend at 115 200 atoms (``REFERENCE_MAX_ATOMS``: its
per-atom time grows with N -- about 1.8x (descriptors) and 2.2x (energy + forces)
from 225 to 1800 atoms on one core -- so over a minute per round there, and XLA
temporaries of ~7 GB: 0.85 GB at 14 400 atoms, linear in the pairs); DScribe
above 225 atoms (dense O(N^2) derivatives: 78 GiB analytical, 49 GiB numerical at
1800 atoms; and ~(N/225)^2 the time).

At module teardown a summary table is printed: min time per atom (µs/atom) per
implementation and size, the numba/reference ratios, and, for the numba
forward+backward, the kernel flop rate as a fraction of the 166 GFLOP/s float32
peak of this CPU, counted with ``kernels.cpu.descriptors.flop_counts`` (forward +
vjp, per pair and per centre) and the peak of ``bench_kernels_cpu_descriptors.py``
(a 2-core peak: with one numba thread the fraction of one core is twice that).  The
timed call includes the JAX side (pair displacements, CSR offsets, the scatter of the
pair gradients to the positions), so it is a little below the bare-kernel rate.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SHARED, module_summary, timed_pedantic

STRUCTURE = SHARED / "EAN_md_initial.gro"
PARAMS = SHARED / "neuralil_morse_params.pickle"

REPS = [1, 2, 4, 8]  # replicas per direction: 225 k^3 atoms
ROUNDS = {1: 20, 2: 10, 4: 5, 8: 3}
BACKENDS = ["numba", "reference"]
DSCRIBE_METHODS = ["analytical", "numerical"]
SPECIES = ("C", "H", "N", "O")
R_CUT, N_MAX, L_MAX = 3.5, 4, 4
# The reference backend (pure JAX on the same pair list: O(pairs) memory, no dense
# N^2 list) grows faster than linearly in time: per atom, x1.8 (descriptors fwd+bwd,
# 71 -> 129 us) and x2.2 (energy + forces, 70 -> 158 us) from 225 to 1800 atoms, float32,
# one core.  XLA temporaries (compiled memory_analysis): 0.1 GB at 1800 atoms, 0.85 GB
# at 14 400, so ~7 GB at 115 200, where a round would also take over a minute.
REFERENCE_MAX_ATOMS = 14400
# DScribe single-round times measured at 225 atoms on this machine (one core): used to
# estimate larger sizes (x (N / 225)^2) when the 225-atom case has not run in this session.
DSCRIBE_225_S = {"analytical": 1.0, "numerical": 15.0}  # measured 0.6-2.3 s, 13-22 s
DSCRIBE_MAX_S = 120.0

_RESULTS: dict[tuple, dict] = {}


def _n_atoms(rep: int) -> int:
    return 225 * rep**3


def _ids(rep: int) -> str:
    return f"N{_n_atoms(rep)}"


@functools.cache
def _kernel_bench():
    """benchmarks/bench_kernels_cpu_descriptors.py as a module (for PEAK_F32)."""
    path = Path(__file__).with_name("bench_kernels_cpu_descriptors.py")
    spec = importlib.util.spec_from_file_location("bench_kernels_cpu_descriptors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _atoms(rep: int):
    if not STRUCTURE.is_file():
        pytest.skip(f"shared EAN data absent ({STRUCTURE})")
    import ase.io

    return ase.io.read(STRUCTURE).repeat((rep,) * 3)


@functools.cache
def _inputs(rep: int):
    """float32 jax arrays of the structure and its (unpadded) numba pair list."""
    import jax.numpy as jnp

    from neuralil_fast.geometry import species_indices
    from neuralil_fast.neighbors import allocate

    atoms = _atoms(rep)
    pos = np.asarray(atoms.get_positions())
    cell = np.asarray(atoms.get_cell())
    nl = allocate(pos, cell, atoms.pbc, R_CUT, backend="numba", capacity_multiplier=1.0)
    n_pairs = int(nl.n_pairs)
    species = species_indices(atoms.numbers, SPECIES)
    centers, neighbors = np.asarray(nl.centers), np.asarray(nl.neighbors)
    n = len(atoms)
    species_j = np.where(centers < n, species[np.minimum(neighbors, n - 1)], 0).astype(np.int32)
    return dict(
        n_atoms=n, n_pairs=n_pairs,
        positions=jnp.asarray(pos, jnp.float32), cell=jnp.asarray(cell, jnp.float32),
        species=jnp.asarray(species), centers=nl.centers, neighbors=nl.neighbors,
        shifts=nl.shifts, species_j=jnp.asarray(species_j),
    )


@functools.partial(jax.jit, static_argnames=("spec", "backend"))
def _descriptors_fwd_bwd(spec, positions, cell, centers, neighbors, shifts, species_j, X_bar,
                         backend):
    """Descriptors (N, F) and the VJP of X_bar to the positions (N, 3)."""
    from neuralil_fast.descriptors import descriptors
    from neuralil_fast.neighbors import pair_displacements

    def f(pos):
        d = pair_displacements(pos, cell, centers, neighbors, shifts)
        return descriptors(spec, d, centers, species_j, pos.shape[0], backend=backend)

    X, vjp = jax.vjp(f, positions)
    return X, vjp(X_bar)[0]


def _record(benchmark, key, n_atoms, best, **extra):
    info = {"atoms": n_atoms, "us_per_atom": best * 1e6 / n_atoms, "min_s": best, **extra}
    benchmark.extra_info.update(info)
    _RESULTS[key] = info


@pytest.fixture(scope="module")
def ean_model():
    if not PARAMS.is_file():
        pytest.skip(f"shared EAN data absent ({PARAMS})")
    import neuralil_fast as nf

    return nf.from_neuralil(PARAMS)


def _skip_reference(backend, rep):
    if backend == "reference" and _n_atoms(rep) > REFERENCE_MAX_ATOMS:
        pytest.skip(f"reference backend at {_n_atoms(rep)} atoms: its per-atom time grows "
                    f"~2x per 8x atoms (>1 min per round estimated here) and its XLA "
                    f"temporaries reach ~7 GB; timed up to {REFERENCE_MAX_ATOMS} atoms")


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("rep", REPS, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_descriptors_fwd_bwd(benchmark, backend, rep):
    import jax.numpy as jnp

    from neuralil_fast.descriptors import DescriptorSpec

    _skip_reference(backend, rep)
    inp = _inputs(rep)
    spec = DescriptorSpec(len(SPECIES), R_CUT, N_MAX)
    n = inp["n_atoms"]
    X_bar = jnp.asarray(np.random.default_rng(0).normal(size=(n, spec.n_features)), jnp.float32)
    args = (spec, inp["positions"], inp["cell"], inp["centers"], inp["neighbors"],
            inp["shifts"], inp["species_j"], X_bar)

    def run():
        return jax.block_until_ready(_descriptors_fwd_bwd(*args, backend=backend))

    run()  # compile
    benchmark.group = f"descriptors fwd+bwd N={n:>6}"
    (X, g), best = timed_pedantic(benchmark, run, ROUNDS[rep], warmup_rounds=1)
    assert X.shape == (n, spec.n_features) and bool(jnp.all(jnp.isfinite(g)))
    extra = {"pairs": inp["n_pairs"], "backend": backend, "dtype": "float32"}
    if backend == "numba":
        import numba

        from neuralil_fast.kernels.cpu.descriptors import flop_counts_of, make_tables

        # float32: the polynomial radial path
        fl = flop_counts_of(make_tables(N_MAX, R_CUT, len(SPECIES), np.float32))
        flops = sum(fl[k][0] * inp["n_pairs"] + fl[k][1] * n for k in ("forward", "vjp"))
        extra.update(gflops=flops / best / 1e9,
                     frac_f32_peak=flops / best / _kernel_bench().PEAK_F32,
                     numba_threads=numba.get_num_threads())
    _record(benchmark, ("desc", backend, n), n, best, **extra)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("rep", REPS, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_forces(benchmark, ean_model, backend, rep):
    from neuralil_fast.potential import evaluate_jit

    _skip_reference(backend, rep)
    model, params = ean_model
    inp = _inputs(rep)
    n = inp["n_atoms"]
    args = (model, params, inp["positions"], inp["cell"], inp["species"], inp["centers"],
            inp["neighbors"], inp["shifts"])

    def run():
        return jax.block_until_ready(evaluate_jit(*args, backend=backend, stress=False))

    run()  # compile
    benchmark.group = f"energy+forces N={n:>6}"
    out, best = timed_pedantic(benchmark, run, ROUNDS[rep], warmup_rounds=1)
    assert out["forces"].shape == (n, 3) and np.isfinite(float(out["energy"]))
    _record(benchmark, ("ef", backend, n), n, best, pairs=inp["n_pairs"], backend=backend,
            dtype="float32")


def _dscribe_bytes(method: str, n: int, n_features: int) -> int:
    """Dense float64 arrays DScribe allocates for all-atom derivatives of n atoms."""
    b = n * n * 3 * n_features * 8 + n * n_features * 8  # derivatives + descriptor
    if method == "analytical":
        b += 3 * n * n * len(SPECIES) * N_MAX * (L_MAX + 1) ** 2 * 8  # xd, yd, zd
    return b


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("rep", REPS, ids=_ids)
@pytest.mark.parametrize("method", DSCRIBE_METHODS)
def test_dscribe_soap(benchmark, method, rep):
    dscribe = pytest.importorskip("dscribe.descriptors", reason="dscribe not installed "
                                  "(pip install 'neuralil_fast[bench]')")
    # DScribe 2.1.2 raises ValueError("Analytical derivatives currently not available for
    # periodic systems.") for periodic=True: analytical runs on the open cluster.
    periodic = method == "numerical"
    soap = dscribe.SOAP(species=list(SPECIES), r_cut=R_CUT, n_max=N_MAX, l_max=L_MAX,
                        periodic=periodic)
    n = _n_atoms(rep)
    need = _dscribe_bytes(method, n, soap.get_number_of_features())
    if need > _ram_bytes() // 2:
        pytest.skip(f"DScribe {method} at {n} atoms: dense O(N^2) derivative arrays need "
                    f"{need / 2**30:.0f} GiB (> half of {_ram_bytes() / 2**30:.0f} GiB RAM)")
    small = _RESULTS.get(("dscribe", method, 225))
    t225 = small["min_s"] if small else DSCRIBE_225_S[method]
    est = t225 * (n / 225) ** 2
    if est > DSCRIBE_MAX_S:
        pytest.skip(f"DScribe {method} at {n} atoms: ~{est:.0f} s per round estimated "
                    f"({t225:.1f} s at 225 atoms x (N/225)^2) > {DSCRIBE_MAX_S:.0f} s")
    atoms = _atoms(rep)
    if not periodic:
        atoms = atoms.copy()
        atoms.pbc = False

    def run():
        return soap.derivatives(atoms, method=method, return_descriptor=True)

    benchmark.group = f"dscribe N={n:>6}"
    # the first call pays page faults on the GB-sized zeroed arrays: warm up when cheap
    rounds, warmup = (1, 0) if est > 10 else (3, 1)
    (d, c), best = timed_pedantic(benchmark, run, rounds, warmup_rounds=warmup)
    assert d.shape == (n, n, 3, soap.get_number_of_features()) and c.shape[0] == n
    del d, c
    _record(benchmark, ("dscribe", method, n), n, best, periodic=periodic, dtype="float64",
            n_features=soap.get_number_of_features(), rounds=rounds)


IMPLS = [("desc", "numba"), ("desc", "reference"), ("ef", "numba"), ("ef", "reference"),
         ("dscribe", "analytical"), ("dscribe", "numerical")]
HEADERS = ["desc numba", "desc ref", "E+F numba", "E+F ref", "DS analyt", "DS numer"]


def _summary_lines():
    lines = []
    write = lines.append
    write("min time per atom (µs/atom), float32 (DScribe float64); desc = descriptors + VJP "
          "to positions, E+F = energy + forces; DS analyt = DScribe analytical (periodic=False), "
          "DS numer = DScribe numerical (periodic=True)")
    write(f"{'N':>7} {'pairs/atom':>10} " + " ".join(f"{h:>10}" for h in HEADERS)
          + f" {'desc ref/numba':>14} {'E+F ref/numba':>13} {'DS analyt/desc numba':>20}")
    for rep in REPS:
        n = _n_atoms(rep)
        row = {impl: _RESULTS.get((*impl, n)) for impl in IMPLS}
        if not any(row.values()):
            continue
        ppa = next((r["pairs"] / n for r in row.values() if r and "pairs" in r), float("nan"))
        cells = " ".join(f"{row[i]['us_per_atom']:10.2f}" if row[i] else f"{'-':>10}"
                         for i in IMPLS)

        def ratio(a, b):
            a, b = row[a], row[b]
            return a["us_per_atom"] / b["us_per_atom"] if a and b else float("nan")

        write(f"{n:>7} {ppa:>10.1f} {cells}"
              f" {ratio(('desc', 'reference'), ('desc', 'numba')):>14.1f}"
              f" {ratio(('ef', 'reference'), ('ef', 'numba')):>13.1f}"
              f" {ratio(('dscribe', 'analytical'), ('desc', 'numba')):>20.0f}")
    flops = [(n, r) for (kind, impl, n), r in sorted(_RESULTS.items(), key=lambda kv: kv[0][2])
             if kind == "desc" and impl == "numba"]
    if flops:
        write("numba descriptors forward+backward (flop_counts forward + vjp), "
              f"fraction of the {_kernel_bench().PEAK_F32 / 1e9:.0f} GFLOP/s float32 peak:")
        for n, r in flops:
            write(f"  N={n:>6}: {r['gflops']:.2f} GFLOP/s = {100 * r['frac_f32_peak']:.1f}% "
                  f"of peak ({r['numba_threads']} numba thread(s))")
    return lines


_summary = module_summary(_RESULTS, _summary_lines)
