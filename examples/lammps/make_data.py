"""Write the LAMMPS data file of the 225-atom EAN box (examples/lammps/ean.data).

    python examples/lammps/make_data.py [../shared/data/ean/EAN_md_initial.gro] [ean.data]

The EAN structure is shared data that stays outside the repository, so the
data file is generated here rather than committed.  Types: 1 C, 2 H, 3 N, 4 O
(the --elements default of run.py); velocities from the .gro (Å/ps).
"""
import os
import sys

import ase.io

from neuralil_fast.lammps import write_data

HERE = os.path.dirname(os.path.abspath(__file__))
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    HERE, "..", "..", "..", "shared", "data", "ean", "EAN_md_initial.gro")
dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "ean.data")
atoms = ase.io.read(src)
atoms.wrap()
write_data(dst, atoms, ["C", "H", "N", "O"])
print(f"wrote {dst}: {len(atoms)} atoms")
