#!/usr/bin/env bash
# A throw-away single-host SLURM for the tests: munged, slurmctld and one slurmd per
# emulated node, all on localhost, all state in one temporary folder, nothing under /etc.
#
#   .ci/slurm.sh install   apt-get install slurm-wlm munge when missing (root only)
#   .ci/slurm.sh up        write the config, start the daemons, wait until the nodes are idle
#   .ci/slurm.sh down      stop the daemons started by `up` (by their pid files) and clean up
#   .ci/slurm.sh env       print `export SLURM_CONF=...` for a shell: eval "$(.ci/slurm.sh env)"
#
# Environment: ALIGNFL_SLURM_DIR (state folder, default /tmp/alignfl-slurm),
# ALIGNFL_SLURM_NODES (emulated nodes, default 2; each is a slurmd with its own NodeName and
# port on this host), ALIGNFL_SLURM_PORT (first port, default 16817: slurmctld, then one per
# slurmd). The daemons run as root (SlurmUser=root): meant for a CI machine or container.
set -euo pipefail

DIR=${ALIGNFL_SLURM_DIR:-/tmp/alignfl-slurm}
NODES=${ALIGNFL_SLURM_NODES:-2}
PORT=${ALIGNFL_SLURM_PORT:-16817}
GPUS=${ALIGNFL_SLURM_GPUS:-16}
CONF=$DIR/slurm.conf
SOCK=$DIR/munge/munge.socket

say() { echo "slurm.sh: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    say "slurm $(slurmd -V | awk '{print $2}') and munge already installed"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    say "slurm-wlm/munge not installed and not root: cannot install"
    return 1
  fi
  local t0=$SECONDS
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm munge >"${TMPDIR:-/tmp}/alignfl-slurm-apt.log" 2>&1 || {
    # a fresh machine may lack the package lists
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"${TMPDIR:-/tmp}/alignfl-slurm-apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurm-wlm munge >>"${TMPDIR:-/tmp}/alignfl-slurm-apt.log" 2>&1
  } || { say "apt-get install slurm-wlm munge failed:"; tail -5 "${TMPDIR:-/tmp}/alignfl-slurm-apt.log" >&2; return 1; }
  say "installed slurm $(slurmd -V | awk '{print $2}') in $((SECONDS - t0)) s"
}

node_name() { echo "ci$1"; }

write_conf() {
  local cpus mem i g
  cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the RAM, in MB
  mkdir -p "$DIR"/{state,log,munge,spool,dev}
  : >"$DIR/gres.conf"
  cat >"$CONF" <<EOF
# Written by .ci/slurm.sh: a single-host test cluster. Not for production.
ClusterName=alignfl-ci
# Job ids unlike any earlier test cluster's on this host: MPICH names its /dev/shm segments
# after job.step, and one left by a killed run would hang a later job with the same id.
FirstJobId=$(( $(date +%s) % 60000000 + 1 ))
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
GresTypes=gpu
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=$(node_name $i) NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN" >>"$CONF"
    # fake GPUs: links to /dev/null in place of /dev/nvidiaN, so that the GPU options of the
    # sbatch scripts are parsed, scheduled and bound (CUDA_VISIBLE_DEVICES) for real
    echo "NodeName=$(node_name $i) Name=gpu File=$DIR/dev/$(node_name $i)-gpu[0-$((GPUS - 1))]" >>"$DIR/gres.conf"
    for ((g = 0; g < GPUS; g++)); do ln -sfn /dev/null "$DIR/dev/$(node_name $i)-gpu$g"; done
  done
  # FORCE:2: two jobs may share a core, so the tests' three tiny jobs run side by side
  echo "PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2" >>"$CONF"
}

start_munge() {
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
  fi
  chmod 700 "$DIR/munge"
  chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
}

wait_idle() {
  local deadline=$((SECONDS + ${1:-60})) idle
  while ((SECONDS < deadline)); do
    idle=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)
    if [ "$idle" -ge "$NODES" ]; then
      return 0
    fi
    sleep 0.5
  done
  say "nodes not idle after ${1:-60} s:"
  SLURM_CONF=$CONF timeout 10 sinfo -N -l >&2 || true
  tail -20 "$DIR"/log/*.log >&2 || true
  return 1
}

up() {
  rm -rf "$DIR"/{state,log,spool}  # a fresh cluster: no jobs or logs of an earlier one
  local t0=$SECONDS i
  command -v slurmctld >/dev/null || { say "slurmctld not installed (.ci/slurm.sh install)"; return 1; }
  [ "$(id -u)" = 0 ] || { say "the test cluster runs its daemons as root; not root"; return 1; }
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    say "already up in $DIR"
    return 0
  fi
  write_conf
  start_munge
  SLURM_CONF=$CONF slurmctld -i
  for ((i = 1; i <= NODES; i++)); do
    SLURM_CONF=$CONF slurmd -N "$(node_name $i)"
  done
  wait_idle 60
  say "up in $((SECONDS - t0)) s: slurm $(slurmd -V | awk '{print $2}'), $NODES node(s) x $(getconf _NPROCESSORS_ONLN) CPUs, SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 10 s
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  local f
  if [ -f "$CONF" ]; then
    # cancel what is left so no job step outlives its slurmd
    SLURM_CONF=$CONF timeout 10 scancel --full --quiet --partition=ci 2>/dev/null || true
  fi
  for f in "$DIR"/slurmd-*.pid; do
    [ -e "$f" ] && stop_pid "$f"
  done
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munge/munged.pid"
  say "down ($DIR kept for its logs)"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|up|down|env" >&2; exit 2 ;;
esac
