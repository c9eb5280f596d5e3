"""Ethylammonium nitrate (EAN) geometry: single ions and packed periodic boxes.

Pure numpy + ASE.  The ions are built from bond lengths, bond angles and
dihedrals (a small Z-matrix, placed with the natural-extension reference frame
construction), then packed as rigid bodies with random rotations and
translations into a cubic periodic box at the experimental density.

Atom orders (the same as the project's DFT data):

* ethylammonium CH3-CH2-NH3+: ``N H H H C H H C H H H``
  (ammonium N, its three H, the methylene C, its two H, the methyl C, its three H)
* nitrate NO3-: ``N O O O``

A box holds all cations first, then all anions.
"""
from __future__ import annotations

import numpy as np
from ase import Atoms

# Bond lengths in Å and angles in degrees (standard values for these ions).
BOND = {
    "N-H": 1.03,   # ammonium N-H
    "C-N": 1.50,   # C-N in an alkylammonium
    "C-C": 1.52,
    "C-H": 1.09,
    "N-O": 1.25,   # nitrate N-O
}
TETRAHEDRAL = float(np.degrees(np.arccos(-1.0 / 3.0)))  # 109.4712...
TRIGONAL = 120.0

#: Molar mass of one ion pair in g/mol (C2H8N2O3).
EAN_MOLAR_MASS = 108.1
#: Experimental density of liquid EAN at room temperature in g/cm^3.
EAN_DENSITY = 1.21
AVOGADRO = 6.02214076e23

CATION_SYMBOLS = "NHHHCHHCHHH"
ANION_SYMBOLS = "NOOO"

#: Default minimum intermolecular distances (Å) used when packing.
MIN_HEAVY = 1.7
MIN_WITH_H = 1.2


def place_atom(a, b, c, bond: float, angle: float, dihedral: float) -> np.ndarray:
    """Position of atom D from atoms A, B, C and internal coordinates.

    ``bond`` is |CD|, ``angle`` the angle B-C-D and ``dihedral`` the torsion
    A-B-C-D, both in degrees (natural-extension reference frame method).
    """
    a, b, c = (np.asarray(x, dtype=float) for x in (a, b, c))
    theta = np.radians(angle)
    phi = np.radians(dihedral)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d_local = bond * np.array(
        [-np.cos(theta), np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)]
    )
    return c + d_local[0] * bc + d_local[1] * m + d_local[2] * n


def _centered(atoms: Atoms) -> Atoms:
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def ethylammonium() -> Atoms:
    """One CH3-CH2-NH3+ cation (11 atoms, order N,H,H,H,C,H,H,C,H,H,H), COM at 0.

    Staggered conformation, all bond angles tetrahedral.
    """
    tet = TETRAHEDRAL
    n = np.zeros(3)
    c1 = np.array([BOND["C-N"], 0.0, 0.0])
    # C2 in the xy plane with a tetrahedral N-C1-C2 angle.
    c2 = c1 + BOND["C-C"] * np.array([-np.cos(np.radians(tet)), np.sin(np.radians(tet)), 0.0])
    # Ammonium hydrogens, staggered with respect to C2 (dihedral H-N-C1-C2).
    h_n = [place_atom(c2, c1, n, BOND["N-H"], tet, d) for d in (180.0, 60.0, -60.0)]
    # Methylene hydrogens: dihedral H-C1-N-... measured against C2 around the C1-N bond
    # puts them at +/-120 degrees from C2.
    h_c1 = [place_atom(c2, n, c1, BOND["C-H"], tet, d) for d in (120.0, -120.0)]
    # Methyl hydrogens, staggered with respect to N (dihedral H-C2-C1-N).
    h_c2 = [place_atom(n, c1, c2, BOND["C-H"], tet, d) for d in (180.0, 60.0, -60.0)]
    positions = np.array([n, *h_n, c1, *h_c1, c2, *h_c2])
    return _centered(Atoms(CATION_SYMBOLS, positions=positions))


def nitrate() -> Atoms:
    """One planar NO3- anion (order N,O,O,O), D3h, COM at 0."""
    angles = np.radians([90.0, 90.0 + TRIGONAL, 90.0 + 2 * TRIGONAL])
    o = BOND["N-O"] * np.stack([np.cos(angles), np.sin(angles), np.zeros(3)], axis=1)
    positions = np.vstack([np.zeros(3), o])
    return _centered(Atoms(ANION_SYMBOLS, positions=positions))


def box_length(n_pairs: int, density: float = EAN_DENSITY,
               molar_mass: float | None = None) -> float:
    """Edge (Å) of a cubic box of ``n_pairs`` ion pairs at ``density`` g/cm^3.

    ``molar_mass`` defaults to the mass of one ion pair from ASE's atomic
    masses (108.10 g/mol, equal to :data:`EAN_MOLAR_MASS`).
    """
    if molar_mass is None:
        molar_mass = float(ethylammonium().get_masses().sum() + nitrate().get_masses().sum())
    volume_cm3 = n_pairs * molar_mass / AVOGADRO / density
    return float((volume_cm3 * 1e24) ** (1.0 / 3.0))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed 3x3 rotation matrix (from a random unit quaternion)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _pair_thresholds(heavy_a: np.ndarray, heavy_b: np.ndarray,
                     min_heavy: float, min_with_h: float) -> np.ndarray:
    both = heavy_a[:, None] & heavy_b[None, :]
    return np.where(both, min_heavy, min_with_h)


def min_image_distances(pos_a: np.ndarray, pos_b: np.ndarray, length: float) -> np.ndarray:
    """All distances between two sets of points in a cubic periodic box (minimum image)."""
    d = pos_a[:, None, :] - pos_b[None, :, :]
    d -= length * np.round(d / length)
    return np.linalg.norm(d, axis=-1)


def molecule_ids(n_pairs: int) -> np.ndarray:
    """Molecule index of each atom of a box: cations 0..n-1, then anions n..2n-1."""
    n_cat = len(CATION_SYMBOLS)
    n_an = len(ANION_SYMBOLS)
    return np.concatenate([np.repeat(np.arange(n_pairs), n_cat),
                           np.repeat(np.arange(n_pairs, 2 * n_pairs), n_an)])


def min_intermolecular_margin(atoms: Atoms, mol_ids: np.ndarray,
                              min_heavy: float = MIN_HEAVY,
                              min_with_h: float = MIN_WITH_H) -> float:
    """Smallest (distance - threshold) over atom pairs of different molecules.

    Positive means no overlap.  Uses the minimum image of a cubic cell.
    """
    length = float(atoms.cell[0, 0])
    pos = atoms.positions
    heavy = atoms.numbers > 1
    dist = min_image_distances(pos, pos, length)
    thr = _pair_thresholds(heavy, heavy, min_heavy, min_with_h)
    other = mol_ids[:, None] != mol_ids[None, :]
    return float(np.min((dist - thr)[other]))


def pack_box(n_pairs: int, rng: np.random.Generator, density: float = EAN_DENSITY,
             min_heavy: float = MIN_HEAVY, min_with_h: float = MIN_WITH_H,
             max_tries_per_molecule: int = 5000, max_restarts: int = 50) -> Atoms:
    """Pack ``n_pairs`` EAN ion pairs into a cubic periodic box at ``density``.

    Every ion gets a uniform random rotation and a uniform random centre of
    mass in the box; a placement is accepted when every intermolecular
    distance (minimum image) exceeds ``min_heavy`` between heavy atoms and
    ``min_with_h`` for pairs involving H.  Ions are placed in random order; if
    one cannot be placed in ``max_tries_per_molecule`` tries the box is
    started again.  Molecules are kept whole (their atoms may lie slightly
    outside the cell).  Returned atom order: all cations, then all anions.
    """
    if n_pairs < 1:
        raise ValueError("n_pairs must be at least 1")
    length = box_length(n_pairs, density)
    templates = [ethylammonium()] * n_pairs + [nitrate()] * n_pairs
    total_tries = 0
    for _ in range(max_restarts):
        placed: list[np.ndarray | None] = [None] * (2 * n_pairs)
        placed_pos = np.zeros((0, 3))
        placed_heavy = np.zeros(0, dtype=bool)
        ok = True
        for idx in rng.permutation(2 * n_pairs):
            mol = templates[idx]
            heavy = mol.numbers > 1
            thr = _pair_thresholds(heavy, placed_heavy, min_heavy, min_with_h)
            for _ in range(max_tries_per_molecule):
                total_tries += 1
                pos = mol.positions @ random_rotation(rng).T + rng.uniform(0.0, length, 3)
                if len(placed_pos) == 0 or np.all(
                        min_image_distances(pos, placed_pos, length) > thr):
                    break
            else:
                ok = False
                break
            placed[idx] = pos
            placed_pos = np.vstack([placed_pos, pos])
            placed_heavy = np.concatenate([placed_heavy, heavy])
        if ok:
            symbols = CATION_SYMBOLS * n_pairs + ANION_SYMBOLS * n_pairs
            atoms = Atoms(symbols, positions=np.vstack(placed),
                          cell=[length, length, length], pbc=True)
            atoms.info["pack_attempts"] = total_tries
            return atoms
    raise RuntimeError(
        f"could not pack {n_pairs} EAN ion pairs at {density} g/cm^3 "
        f"after {max_restarts} restarts")
