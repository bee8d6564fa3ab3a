#!/usr/bin/env bash
# Learning quality of ALIGN-FL's global VAE against its two bounds, in one go, on real data:
# FedAvg of the same VAE (the baseline to beat) and the same VAE trained centrally on the
# union of the clients' real in-domain images (the upper bound), every seed on the same
# partition. Then a table (mean ± sd over the seeds) and the goals, PASS or FAIL:
#
#   1. latent accuracy of the global VAE closes >= 80% of the gap between FedAvg and the
#      centralised VAE by round 10, and >= 70% by round 3:
#      closure(r) = (acc_alignfl(r) - acc_fedavg(r)) / (acc_central - acc_fedavg(r));
#   2. reconstruction error <= 1.6 x the centralised VAE's (last round);
#   3. no collapsed latent dimension: in every round, the variance of the test latent means
#      of every dimension >= 5% of the largest (eval attribute latent_var_min_ratio).
#
# The full protocol is the default (the paper-dim8 preset: latent_dim 8, 10 rounds of 10
# local epochs, 6000 images per class, 3 seeds):
#
#   experiments/quality.sh
#
# and the knobs scale it down (a 2-core workstation needs about 40 minutes per seed at full
# size; docs/RESULTS.md has a scaled-down run and its exact command):
#
#   SEEDS="0" ROUNDS=3 LOCAL_EPOCHS=2 PER_CLASS=1000 VAE_EPOCHS=5 experiments/quality.sh
#
# Knobs: SEEDS ("0 1 2"), ROUNDS (10), LOCAL_EPOCHS (10), PER_CLASS (6000; training images
# per class of the class-pairs partition), VAE_EPOCHS (10; epochs of the centralised VAE),
# PRESET (paper-dim8), NP (6 ranks), OUT (runs/quality), DATA_ROOT (--data-root), EXTRA
# (more --set flags for every run, e.g. EXTRA='--set server.epochs=2'). Finished runs are
# skipped and unfinished ones resumed, so a rerun continues.
set -euo pipefail
SEEDS=${SEEDS:-0 1 2}
ROUNDS=${ROUNDS:-10}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-10}
PER_CLASS=${PER_CLASS:-6000}
VAE_EPOCHS=${VAE_EPOCHS:-10}
PRESET=${PRESET:-paper-dim8}
NP=${NP:-6}
OUT=${OUT:-runs/quality}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--preset "$PRESET" --rounds "$ROUNDS" --set "client.local_epochs=$LOCAL_EPOCHS"
        --set "data.scheme_params={per_class=$PER_CLASS}")
[ -n "${DATA_ROOT:-}" ] && common+=(--data-root "$DATA_ROOT")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && common+=($EXTRA)

finished() {  # exit 0 when $1/results.h5 holds a finished run
  python -c "import sys; from alignfl_mpi.results import load; sys.exit(0 if load('$1/results.h5').finished else 1)" 2>/dev/null
}

run() {
  local name=$1; shift
  local resume=()
  if [ -f "$OUT/$name/results.h5" ]; then
    if finished "$OUT/$name"; then echo "== $name: finished, skipped"; return; fi
    resume=(--resume)
  fi
  echo "== $name"
  /usr/bin/env time -f "$name: %e s wall" \
    mpiexec -n "$NP" alignfl-mpi run --output "$OUT/$name" "${common[@]}" "$@" "${resume[@]}"
}

for s in $SEEDS; do
  run "align-fl-s$s" --seed "$s"
  run "fedavg-s$s" --seed "$s" --set 'strategy="fedavg"'
  if ! finished "$OUT/central-s$s/centralized-vae"; then
    partition=$(python -c "from alignfl_mpi.results import load; print(load('$OUT/align-fl-s$s/results.h5').attrs['partition'])")
    rm -rf "$OUT/central-s$s"
    echo "== central-s$s"
    # shellcheck disable=SC2206
    /usr/bin/env time -f "central-s$s: %e s wall" \
      alignfl-mpi reference --what vae --partition "$partition" --out "$OUT/central-s$s" \
        --preset "$PRESET" --vae-epochs "$VAE_EPOCHS" --seed "$s" ${EXTRA:-}
  fi
done

python - "$OUT" "$ROUNDS" $SEEDS <<'PY' | tee "$OUT/summary.md"
import sys
import numpy as np
from alignfl_mpi.results import load

out, rounds, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
A = [load(f"{out}/align-fl-s{s}/results.h5") for s in seeds]
F = [load(f"{out}/fedavg-s{s}/results.h5") for s in seeds]
C = [load(f"{out}/central-s{s}/centralized-vae/results.h5") for s in seeds]

def ms(values):
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

acc_c = np.array([c.eval["latent_accuracy"][-1] for c in C])
rec_c = np.array([c.eval["recon_error"][-1] for c in C])
closure = {}
print(f"seeds {', '.join(seeds)}; {rounds} rounds; mean ± sd over seeds\n")
print("| round | ALIGN-FL latent acc | FedAvg latent acc | centralised VAE | gap closed | "
      "ALIGN-FL recon | recon / centralised | min/max latent var (ALIGN-FL) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in range(rounds):
    a = np.array([x.eval["latent_accuracy"][r] for x in A])
    f = np.array([x.eval["latent_accuracy"][r] for x in F])
    closure[r + 1] = (a - f) / (acc_c - f)
    rec = np.array([x.eval["recon_error"][r] for x in A])
    var = np.array([x.eval["latent_var_min_ratio"][r] for x in A])
    print(f"| {r + 1} | {ms(a)} | {ms(f)} | {ms(acc_c)} | {ms(closure[r + 1])} | {ms(rec)} | "
          f"{ms(rec / rec_c)} | {ms(var)} |")
print(f"\ncentralised VAE (last epoch): latent acc {ms(acc_c)}, F1 "
      f"{ms([c.eval['latent_f1'][-1] for c in C])}, recon {ms(rec_c)}, min/max latent var "
      f"{ms([c.eval['latent_var_min_ratio'][-1] for c in C])}")
print(f"FedAvg (last round): latent acc {ms([x.eval['latent_accuracy'][-1] for x in F])}, "
      f"recon {ms([x.eval['recon_error'][-1] for x in F])}, min/max latent var "
      f"{ms([x.eval['latent_var_min_ratio'][-1] for x in F])}\n")

def verdict(ok):
    return "PASS" if ok else "FAIL"

last = rounds
scaled = "" if rounds >= 10 else f" (scaled down: round {last} stands in for round 10)"
goal10 = closure[min(10, last)].mean()
print(f"- gap closed by round {min(10, last)} >= 80%: {goal10:.1%} -> {verdict(goal10 >= 0.8)}"
      f"{scaled}")
if last >= 3:
    print(f"- gap closed by round 3 >= 70%: {closure[3].mean():.1%} -> "
          f"{verdict(closure[3].mean() >= 0.7)}")
ratio = np.mean([x.eval["recon_error"][-1] for x in A] / rec_c)
print(f"- recon error <= 1.6 x centralised: {ratio:.2f} x -> {verdict(ratio <= 1.6)}")
worst = min(float(np.min(x.eval["latent_var_min_ratio"])) for x in A)
print(f"- no latent dim below 5% of the largest variance, any round and seed: worst "
      f"{worst:.3f} -> {verdict(worst >= 0.05)}")
PY
