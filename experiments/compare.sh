#!/usr/bin/env bash
# The paper's comparison on one or more datasets, at the paper's scale: 5 clients in class
# pairs (6000 images per class), 600 cross-domain outliers on client 0, the MLP VAE with
# latent_dim 2, 5 rounds of 10 local epochs (the `paper` preset of `alignfl-mpi run`).
# Runs: ALIGN-FL (paper setup, and with conditional decoders + a synthetic-only classifier),
# ALIGN-FL with DP (epsilon 10) and with a Lipschitz penalty (lambda 1), the baselines FedAvg,
# FedProx, FedAdam and MOON (each with its default strategy_options), and the references (the
# centralised LeNet, FedAvg of the LeNet, and the centralised VAE, on the same partition); then
# one report and the Markdown table per dataset.
#
#   experiments/compare.sh mnist fashion-mnist      # everything, both datasets
#   RUNS="align-fl fedavg fedprox moon reference" experiments/compare.sh mnist fashion-mnist
#   ROUNDS=3 LOCAL_EPOCHS=2 OUT=runs/compare experiments/compare.sh mnist   # scaled down
#
# On a 2-core workstation one dataset's "align-fl fedavg fedprox moon reference" takes about
# 40 minutes. On a GPU machine nothing changes: `device = "auto"` puts the clients and the
# server on the GPUs. ROUNDS (5) and LOCAL_EPOCHS (10) scale it; NP (6 ranks), OUT
# (runs/compare), DATA_ROOT (--data-root) and RUNS (default: all; `reference` included) are
# the other knobs. Finished runs are skipped and unfinished ones resumed, so a rerun continues.
set -euo pipefail
if [ $# -gt 1 ]; then  # one dataset at a time, the same knobs
  for dataset in "$@"; do bash "$0" "$dataset"; done
  exit
fi
DATASET=${1:-mnist}
case "$DATASET" in mnist|fashion-mnist) ;; *)
  echo "compare.sh: unknown dataset '$DATASET'; choose mnist or fashion-mnist" >&2; exit 2 ;;
esac
NP=${NP:-6}
ROUNDS=${ROUNDS:-5}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-10}
OUT=${OUT:-runs/compare}/$DATASET
ALL="align-fl align-fl-cond align-fl-dp10 align-fl-lip1 fedavg fedprox fedadam moon reference"
RUNS=${RUNS:-$ALL}
for name in $RUNS; do
  [[ " $ALL " == *" $name "* ]] || { echo "compare.sh: unknown run '$name'; choose from: $ALL" >&2; exit 2; }
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--set "data.dataset=\"$DATASET\"" --rounds "$ROUNDS" --set "client.local_epochs=$LOCAL_EPOCHS")
[ -n "${DATA_ROOT:-}" ] && common+=(--data-root "$DATA_ROOT")

want() { [[ " $RUNS " == *" $1 "* ]]; }

finished() {  # exit 0 when $1/results.h5 holds a finished run
  python -c "import sys; from alignfl_mpi.results import load; sys.exit(0 if load('$1/results.h5').finished else 1)" 2>/dev/null
}

run() {
  local name=$1; shift
  want "$name" || return 0
  resume=()
  if [ -f "$OUT/$name/results.h5" ]; then
    if finished "$OUT/$name"; then echo "== $name: finished, skipped"; return; fi
    resume=(--resume)
  fi
  echo "== $name"
  /usr/bin/env time -f "$name: %e s wall" mpiexec -n "$NP" alignfl-mpi run --output "$OUT/$name" "${common[@]}" "$@" "${resume[@]}"
}

run align-fl
run align-fl-cond --set client.model.conditional=true --set server.classifier_epochs=2
run align-fl-dp10 --set client.privacy.mode=\"full\" --set client.privacy.epsilon=10
run align-fl-lip1 --set client.lipschitz.weight=1.0
run fedavg --set strategy=\"fedavg\"
run fedprox --set strategy=\"fedprox\"
run fedadam --set strategy=\"fedadam\"
run moon --set strategy=\"moon\"
runs=()
for name in $RUNS; do [ -f "$OUT/$name/results.h5" ] && runs+=("$OUT/$name"); done
if want reference && [ ! -f "$OUT/reference/centralized/results.h5" ]; then
  [ ${#runs[@]} -gt 0 ] || { echo "compare.sh: the reference needs one federated run for its partition" >&2; exit 2; }
  partition=$(python -c "import sys; from alignfl_mpi.results import load; print(load('${runs[0]}/results.h5').attrs['partition'])")
  alignfl-mpi reference --partition "$partition" --out "$OUT/reference" --rounds "$ROUNDS" --local-epochs "$LOCAL_EPOCHS"
fi
want reference && runs+=("$OUT"/reference/centralized "$OUT"/reference/fedavg-classifier
                         "$OUT"/reference/centralized-vae)
alignfl-mpi report "${runs[@]}" --out "$OUT/report"
python "$(dirname "$0")/results_table.py" "$OUT" | tee "$OUT/table.md"
