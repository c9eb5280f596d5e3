"""GFN2-xTB labels (energy, forces, stress) through tblite's ASE calculator.

tblite is an optional dependency (``pip install neuralil_fast[data]``) and is
imported only when a calculator is made.

Settings used here (:data:`XTB_SETTINGS`, written out so that they are
recorded with the data): the tblite 0.8.0 defaults -- electronic temperature
300 K (Fermi smearing), at most 250 SCF iterations, Broyden mixing with
damping 0.4, superposition-of-atomic-densities initial guess, total charge 0
(the sum of the initial charges of the box), no solvation -- except the SCF
accuracy, 0.1 instead of tblite's default 1.0.  At the default, forces
depend on the SCF starting point by up to 4e-4 eV/Å on a 60-atom EAN box
and differ from central differences of the energy by up to 2e-4 eV/Å; at
0.1 both are a few 1e-5 eV/Å, at no measurable extra cost.

Reproducibility: tblite's SCF starts from the previous wavefunction when a
calculator object is reused with ``cache_api=True`` (its default), so a label
then depends, at the level of the SCF convergence, on what that calculator
computed before.  The pipeline in :mod:`neuralil_fast.datagen.generate` uses
``cache_api=False`` (every calculation starts from the atomic guess; no
slower here).  With more than one OpenMP thread tblite is not bit-reproducible
(differences of about 1e-15 eV/Å, which MD amplifies); :func:`set_threads`
limits it to one.
"""
from __future__ import annotations

import os
from importlib import metadata

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

INSTALL_HINT = ("GFN2-xTB labelling needs the 'tblite' package: "
                "pip install neuralil_fast[data]  (or: pip install tblite)")

#: tblite settings used for the labels (tblite 0.8.0 defaults made explicit, tighter accuracy).
XTB_SETTINGS = {
    "method": "GFN2-xTB",
    "accuracy": 0.1,            # tblite default: 1.0
    "electronic_temperature": 300.0,
    "max_iterations": 250,
    "mixer_damping": 0.4,
    "charge": 0,
}


def have_tblite() -> bool:
    try:
        import tblite.ase  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tblite_ase():
    try:
        from tblite.ase import TBLite
    except ImportError as err:  # ModuleNotFoundError, or a broken shared library
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return TBLite


def tblite_version() -> str:
    try:
        return metadata.version("tblite")
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """Versions of the packages that produce the labels."""
    import ase
    return {
        "tblite": tblite_version(),
        "ase": ase.__version__,
        "numpy": np.__version__,
    }


def make_calculator(**overrides):
    """A quiet ``tblite.ase.TBLite`` with :data:`XTB_SETTINGS` (updated by ``overrides``)."""
    TBLite = _import_tblite_ase()
    settings = {**XTB_SETTINGS, **overrides}
    return TBLite(verbosity=0, **settings)


def compute(atoms: Atoms, calc=None, fresh: bool = False, **overrides) -> dict:
    """Energy (eV), forces (eV/Å) and stress (Voigt, eV/Å^3) of ``atoms``.

    With ``calc`` given it is reused (with tblite's default ``cache_api=True``
    its SCF restarts from the last wavefunction); without it, or with
    ``fresh``, a new calculator made with ``overrides`` is used.
    ``atoms`` itself is not modified.
    """
    if calc is None or fresh:
        calc = make_calculator(**overrides)
    work = atoms.copy()
    work.calc = calc
    energy = float(work.get_potential_energy())
    forces = np.array(work.get_forces())
    out = {"energy": energy, "forces": forces}
    if work.pbc.any():
        out["stress"] = np.array(work.get_stress(voigt=True))
    work.calc = None
    return out


def attach(atoms: Atoms, results: dict) -> Atoms:
    """A copy of ``atoms`` carrying ``results`` in a SinglePointCalculator."""
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, **results)
    return out


def label(atoms: Atoms, calc=None, fresh: bool = False, **overrides) -> Atoms:
    """A copy of ``atoms`` with GFN2-xTB energy, forces and stress attached."""
    return attach(atoms, compute(atoms, calc=calc, fresh=fresh, **overrides))


def set_threads(n: int = 1) -> bool:
    """Limit tblite's OpenMP threads to ``n``.

    With more than one thread tblite's results differ run to run in the last
    bits (reduction order, about 1e-15 eV/Å), which MD then amplifies; one
    thread per process makes reruns bit-identical.  Sets ``OMP_NUM_THREADS``
    (for an OpenMP runtime not yet loaded) and calls ``omp_set_num_threads``
    of the GNU OpenMP runtime that tblite links (for one already loaded).
    Returns whether the runtime call succeeded.
    """
    import ctypes

    os.environ["OMP_NUM_THREADS"] = str(int(n))
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(ctypes.c_int(int(n)))
    except (OSError, AttributeError):
        return False
    return True
