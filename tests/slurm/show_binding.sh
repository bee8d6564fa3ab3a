#!/bin/bash
# Stands in for alignfl-mpi in an sbatch script (ALIGNFL=tests/slurm/show_binding.sh): prints
# one line per task with what runtime.pick_device("auto") sees. The arguments are ignored.
echo "binding node=${SLURMD_NODENAME:-?} rank=${SLURM_PROCID:-?} local=${SLURM_LOCALID:-?} cvd=${CUDA_VISIBLE_DEVICES-unset}"
