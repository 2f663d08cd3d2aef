#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, which starts one
# process per GPU there. Submit from the repository root:
#   sbatch --nodes 4 launch/slurm.sh recipes/mask_rcnn.yaml [key=value ...]
#SBATCH --job-name=mask_rcnn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch launch/slurm.sh RECIPE [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}

# SLURM_NODEID must be read on each node, hence the single quotes around the inner command.
export RECIPE MAIN_HOST MAIN_PORT GPUS_PER_NODE ACCELERATE
srun --kill-on-bad-exit=1 bash -c '
  "$ACCELERATE" launch --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_HOST" \
    --main_process_port "$MAIN_PORT" \
    trainer/run.py "$RECIPE" "$@"
' _ "$@"
