#!/usr/bin/env bash
# Cloud TPU VM slice driver for trigflow-distill. Usage: launch/tpu_vm.sh create|install|run|logs|delete
#   create   gcloud compute tpus tpu-vm create $TPU_NAME (zone, accelerator type, runtime version, project).
#   install  copies this repo (git archive of HEAD, so commit first) to $REMOTE_DIR on every worker and runs
#            `pip install -e .` there plus jax[tpu] (pin JAX_TPU_SPEC if needed).
#   run      starts `python main.py --config=$CONFIG --workdir=$WORKDIR $EXTRA_ARGS` on ALL workers at once
#            (--worker=all), detached with nohup, output to $REMOTE_DIR/train.log on each worker. On TPU VMs
#            jax.distributed.initialize() finds the coordinator, process count and id by itself; $WORKDIR must be
#            shared by all hosts (gs://bucket/path), since every host writes its part of each checkpoint there.
#   logs     streams worker 0's log (tail -f); WORKER=i for another worker.
#   delete   deletes the slice (asks for confirmation unless QUIET=1).
# Env (defaults): TPU_NAME (trigflow), ZONE (us-central2-b), ACCELERATOR_TYPE (v4-16),
#   RUNTIME_VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default), WORKDIR (required for run),
#   CONFIG (configs/predict25_4step.py), EXTRA_ARGS (""), REMOTE_DIR (~/trigflow-distill),
#   JAX_TPU_SPEC (jax[tpu]), WORKER (0).
set -euo pipefail

TPU_NAME=${TPU_NAME:-trigflow}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/predict25_4step.py}
EXTRA_ARGS=${EXTRA_ARGS:-}
REMOTE_DIR=${REMOTE_DIR:-trigflow-distill}   # relative to the remote home directory
JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ;;
  install)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
    tpu scp "$archive" "$TPU_NAME":trigflow-src.tar.gz --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf trigflow-src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m pip install -U pip && python3 -m pip install '$JAX_TPU_SPEC' && python3 -m pip install -e ." ;;
  run)
    : "${WORKDIR:?set WORKDIR to a path all workers share, e.g. gs://bucket/run1}"
    on_all "cd $REMOTE_DIR && nohup python3 main.py --config=$CONFIG --workdir=$WORKDIR $EXTRA_ARGS \
> train.log 2>&1 < /dev/null &" ;;
  logs)
    tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n 200 -f $REMOTE_DIR/train.log" ;;
  delete)
    if [[ "${QUIET:-0}" == 1 ]]; then tpu delete "$TPU_NAME" --quiet; else tpu delete "$TPU_NAME"; fi ;;
  *)
    echo "usage: $0 create|install|run|logs|delete (configure with env vars, see the header)" >&2; exit 2 ;;
esac
