#!/bin/bash
# Stands in for alignfl-mpi (ALIGNFL=tests/slurm/sleep_once.sh): the first run of a job sleeps
# until SLURM ends it, a requeued run (SLURM_RESTART_COUNT >= 1) ends at once.
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
  echo "sleep_once: restart ${SLURM_RESTART_COUNT}, done"
  exit 0
fi
exec sleep 300
