#!/usr/bin/env bash
# Multi-node GPU training under SLURM: `sbatch launch/slurm_gpu.sh` (override #SBATCH lines on the command line,
# e.g. `sbatch --nodes=4 launch/slurm_gpu.sh`). Starts ONE process per node (it drives all the node's GPUs) with
#   --coordinator_address=<first node of SLURM_JOB_NODELIST>:$PORT --num_processes=$SLURM_NTASKS
#   --process_id=$SLURM_PROCID
# so main.py calls jax.distributed.initialize with them. WORKDIR must be on a filesystem all nodes share.
# Env (defaults): WORKDIR (required), CONFIG (configs/predict25_4step.py), EXTRA_ARGS (""), PORT (12355),
#   VENV (.venv under the repo; activated when it exists).
#SBATCH --job-name=trigflow-distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

: "${WORKDIR:?set WORKDIR to a directory all nodes share}"
CONFIG=${CONFIG:-configs/predict25_4step.py}
EXTRA_ARGS=${EXTRA_ARGS:-}
PORT=${PORT:-12355}
REPO_ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
VENV=${VENV:-$REPO_ROOT/.venv}

COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export COORDINATOR PORT CONFIG WORKDIR EXTRA_ARGS REPO_ROOT VENV

# SLURM_PROCID differs per task, so it is expanded inside each task's shell, not here.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  cd "$REPO_ROOT"
  if [[ -f "$VENV/bin/activate" ]]; then source "$VENV/bin/activate"; fi
  # EXTRA_ARGS is split into words on purpose.
  # shellcheck disable=SC2086
  exec python main.py --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="$COORDINATOR:$PORT" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID" \
    $EXTRA_ARGS'
