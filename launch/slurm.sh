#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, which starts one
# process per GPU there. Submit from the repository root:
#   sbatch --nodes 4 launch/slurm.sh recipes/mask_rcnn.yaml [key=value ...]
#
# Time limit: SLURM sends USR1 to this script 5 minutes before it (--signal below); the run
# finishes its update, saves that iteration, exits, and the job is requeued; the requeued
# job (SLURM_RESTART_COUNT > 0) continues with resume=auto. Preemption and scancel send
# SIGTERM to every process: the run saves the same way, and SLURM's own policy decides
# whether the job comes back. Keep the warning time above one update plus a checkpoint
# save (and above a val phase, which is not interrupted).
#SBATCH --job-name=mask_rcnn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch launch/slurm.sh RECIPE [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/multi_node.yaml}
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  RESUME=(resume=auto)
  echo "requeued job (restart ${SLURM_RESTART_COUNT}): continuing from the latest checkpoint"
fi

requeue=false
on_time_limit() {
  echo "time limit near: the run stops after its current update with a checkpoint"
  requeue=true
  kill -USR1 "$srun_pid" 2>/dev/null || true  # srun passes it on to every task
}
on_terminate() {
  echo "SIGTERM: the run stops after its current update with a checkpoint"
}
trap on_time_limit USR1
trap on_terminate TERM  # this script must outlive the run, or SLURM ends the job at once

# SLURM_NODEID must be read on each node, hence the single quotes around the inner command.
# The launcher ignores USR1 (its default action would end it and its workers with it); the
# training processes handle it.
export RECIPE MAIN_HOST MAIN_PORT GPUS_PER_NODE ACCELERATE LAUNCH_CONFIG
srun --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  exec "$ACCELERATE" launch --config_file "$LAUNCH_CONFIG" \
    --num_machines "$SLURM_NNODES" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_HOST" \
    --main_process_port "$MAIN_PORT" \
    trainer/run.py "$RECIPE" "$@"
' _ "${RESUME[@]}" "$@" &
srun_pid=$!

status=0
# `wait` returns early when a trapped signal arrives: wait until srun itself has ended.
while true; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if $requeue; then
  echo "requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
