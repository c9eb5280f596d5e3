"""Shared fixtures for the test-suite.

* x64 is never switched on globally: tests that need float64 ask for the ``x64``
  fixture or for the ``dtype`` parametrisation (float32 / float64 with per-dtype
  tolerances in ``tol``).
* Every test runs with ``jax_debug_nans`` on (autouse fixture): a NaN produced by
  any primitive, forward or backward, fails the test.
* ``shared_dir`` / ``ean_atoms``: the EAN DFT configurations in ../shared (tests
  using them skip with a reason where ../shared is absent).
* ``small_system`` / ``initial_momenta``: a small random periodic C/H/N/O box and
  thermal momenta for it (plain helpers: ``from conftest import small_system``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# --------------------------------------------------------------------------- hypothesis

settings.register_profile(
    "neuralil",
    deadline=None,
    # The autouse debug-NaN / x64 fixtures wrap the whole test, every example included:
    # that is what we want, so the function-scoped-fixture health check does not apply.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("neuralil")

# --------------------------------------------------------------------------- JAX modes


@pytest.fixture(autouse=True)
def _debug_nans():
    """Every test runs with jax_debug_nans on (restored afterwards)."""
    with jax.debug_nans(True):
        yield


@pytest.fixture
def x64():
    """Run the test with 64-bit JAX types (restored afterwards; never global)."""
    with jax.enable_x64(True):
        yield


# Per-dtype tolerances for comparisons of computed values (rtol; atol is relative to
# the scale of the compared quantity) and for finite-difference gradient checks.
TOLERANCES = {
    "float32": dict(rtol=2e-4, atol=2e-5, fd_rtol=5e-2),
    "float64": dict(rtol=1e-10, atol=1e-12, fd_rtol=1e-6),
}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """A JAX float dtype; float64 runs inside ``jax.enable_x64(True)``."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


@pytest.fixture
def tol(dtype):
    return TOLERANCES[jnp.dtype(dtype).name]


# --------------------------------------------------------------------------- compilation

_SHARED_COMPILE_JOBS = ("float64", "float32")  # numba descriptor kernels per dtype (~3 min each cold)


@pytest.fixture(scope="session", autouse=True)
def _split_first_compilation(request):
    """pytest-xdist workers split the first compilation of the numba descriptor kernels.

    Without it, each worker compiles both dtypes' kernels when its tests first need them
    (about 3 minutes each with empty caches, the workers at once): here worker k starts
    with dtype k, the next dtype's lock tells it whether another worker is compiling that
    one, and it waits for that worker instead (then loads from numba's and the handler
    cache).  Only under xdist with two or more workers, when the kernel test files are
    among the selected tests; with warm caches every job is a load.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2 or not worker[2:].isdigit():
        return
    kernel_files = {"test_kernels_jax.py", "test_kernels_cpu_descriptors.py"}
    if not any(Path(str(item.fspath)).name in kernel_files for item in request.session.items):
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: each worker compiles what it needs
        return
    from neuralil_fast.kernels_api import compile_numba_kernels, numba_available

    if not numba_available():
        return
    # one lock folder per checkout and cache setting: other runs compile into other caches
    key = "|".join([str(Path(__file__).resolve().parent), os.environ.get("NUMBA_CACHE_DIR", ""),
                    os.environ.get("NEURALIL_FAST_CACHE", "")])
    locks = Path(tempfile.gettempdir()) / (
        f"neuralil_fast_compile_{os.getuid()}_{hashlib.sha1(key.encode()).hexdigest()[:12]}")
    locks.mkdir(exist_ok=True)
    k = int(worker[2:]) % len(_SHARED_COMPILE_JOBS)

    def compile_(job):
        try:
            compile_numba_kernels(job)
        except Exception as err:  # noqa: BLE001 - the kernel tests report it themselves
            warnings.warn(f"warm-up compilation of the {job} kernels failed: {err}")

    waiting = []
    for job in _SHARED_COMPILE_JOBS[k:] + _SHARED_COMPILE_JOBS[:k]:
        lock = open(locks / job, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker is compiling it
            waiting.append((job, lock))
            continue
        compile_(job)
        lock.close()  # releases the lock
    for job, lock in waiting:
        fcntl.flock(lock, fcntl.LOCK_EX)
        compile_(job)  # loads what the other worker compiled
        lock.close()


# --------------------------------------------------------------------------- shared data

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
EAN_FILE = SHARED_DIR / "data" / "ean" / "ean_dft_60.jsonl"

# Each EAN configuration: 15 ethylammonium cations then 15 nitrate anions.
EAN_SYMBOLS = ["N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H"] * 15 + ["N", "O", "O", "O"] * 15


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder {SHARED_DIR} is absent (it lives beside the checkout)")
    return SHARED_DIR


@lru_cache(maxsize=None)
def _ean_lines() -> tuple[str, ...]:
    if not EAN_FILE.is_file():
        pytest.skip(f"EAN data {EAN_FILE} is absent (../shared/data/ean beside the checkout)")
    return tuple(line for line in EAN_FILE.read_text().splitlines() if line.strip())


def ean_atoms(index: int):
    """EAN DFT configuration ``index`` (0-based line of ean_dft_60.jsonl) as ase.Atoms.

    Positions as stored (possibly outside the cell), cubic periodic cell, the DFT
    energy and forces in ``atoms.info["energy"]`` / ``atoms.arrays["dft_forces"]``.
    Skips the calling test when ../shared is absent.
    """
    import ase

    record = json.loads(_ean_lines()[index])
    positions = np.asarray(record["Positions"], dtype=np.float64)
    assert positions.shape == (len(EAN_SYMBOLS), 3)
    atoms = ase.Atoms(
        symbols=EAN_SYMBOLS,
        positions=positions,
        cell=np.diag(np.asarray(record["Cell-Size"], dtype=np.float64)),
        pbc=True,
    )
    atoms.info["energy"] = float(record["Energy"])
    atoms.arrays["dft_forces"] = np.asarray(record["Forces"], dtype=np.float64)
    return atoms


@pytest.fixture
def ean(shared_dir):
    """The ``ean_atoms`` helper as a fixture (skips where ../shared is absent)."""
    return ean_atoms


# --------------------------------------------------------------------------- small systems


def small_system(seed=0, n=24, length=7.0, min_dist=1.3):
    """n random C/H/N/O atoms in a periodic cube, no two closer than min_dist Å."""
    import ase

    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0, length, 3)
        d = np.asarray(pos).reshape(-1, 3) - p
        d -= length * np.round(d / length)
        if len(pos) == 0 or np.min(np.linalg.norm(d, axis=1)) >= min_dist:
            pos.append(p)
    symbols = rng.choice(["C", "H", "N", "O"], n)
    return ase.Atoms(symbols, positions=pos, cell=[length] * 3, pbc=True)


def initial_momenta(atoms, kT=0.05, seed=1):
    """(N, 3) Maxwell-Boltzmann momenta at kT (eV), zero total momentum."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * kT)
    return p - p.mean(axis=0)


def numerical_stress(atoms, eps=1e-6):
    """ASE's central-difference stress (Voigt, eV/Å³) of ``atoms`` with its calculator
    (``ase.calculators.fd`` from ASE 3.24; the calculator's own method, since deprecated,
    before)."""
    try:
        from ase.calculators.fd import calculate_numerical_stress
    except ImportError:
        return atoms.calc.calculate_numerical_stress(atoms, d=eps)
    return calculate_numerical_stress(atoms, eps=eps)


def fd_forces(atoms, make_calc, rows, h=1e-5):
    """(len(rows), 3) central-difference forces, eV/Å, of the atoms ``rows``.

    make_calc(): a fresh ASE calculator for each displaced copy of ``atoms``.
    """
    out = np.zeros((len(rows), 3))
    for n, a in enumerate(rows):
        for k in range(3):
            e = []
            for s in (+1, -1):
                shifted = atoms.copy()
                shifted.calc = make_calc()
                shifted.positions[a, k] += s * h
                e.append(shifted.get_potential_energy())
            out[n, k] = -(e[0] - e[1]) / (2 * h)
    return out
