"""MD step (energy + forces + stress through nf.Calculator) on the small EAN sizes.

Run::

    /work/venv/bin/pytest benchmarks/test_bench_md.py --benchmark-enable \
        --benchmark-columns=min,mean,rounds

The EAN box (225 atoms) and its 2x2x2 replica (1800 atoms) with the shared
NeuralIL+Morse parameters; one round = one velocity-Verlet step.  The larger
sizes (to 10^6 atoms, with peak memory) are in bench_md_scaling.py.  The
1800-atom case is skipped on the reference backend (its dense O(N^2) list).
"""
from __future__ import annotations

import pytest
from conftest import SHARED


@pytest.fixture(scope="module")
def ean_model():
    if not (SHARED / "neuralil_morse_params.pickle").is_file():
        pytest.skip(f"shared EAN data absent ({SHARED})")
    import neuralil_fast as nf

    return nf.from_neuralil(SHARED / "neuralil_morse_params.pickle")


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_md_step(benchmark, ean_model, rep, dtype):
    import ase.io
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import neuralil_fast as nf
    from neuralil_fast.backends import resolve_backend

    backend = resolve_backend("auto")
    if rep > 1 and backend == "reference":
        pytest.skip("1800 atoms on the reference backend (dense O(N^2) neighbour build)")
    model, params = ean_model
    atoms = ase.io.read(SHARED / "EAN_md_initial.gro").repeat((rep,) * 3)
    atoms.calc = nf.Calculator(model, params, backend=backend, dtype=dtype)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(2)  # compile the evaluation and the neighbour-list update
    benchmark.extra_info.update(n_atoms=len(atoms), backend=backend, dtype=dtype)
    benchmark.pedantic(dyn.run, args=(1,), rounds=5, iterations=1)
    assert abs(atoms.get_potential_energy()) > 0
