#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install switch_jax on every worker, and run one training command
# on all workers at once (docs/tpu.md explains the choices). Usage:
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=switch-base ACCELERATOR=v4-64
#   export MODEL_DIR=gs://my-bucket/switch_base_128
#   scripts/launch_tpu_pod.sh create        # the slice (add SPOT=1 for spot capacity)
#   scripts/launch_tpu_pod.sh install       # copy this checkout to every worker, pip install
#   scripts/launch_tpu_pod.sh train --gin_file=models/switch_base.gin \
#       --gin_file=runs/pretrain.gin --gin.MESH_SHAPE="(1, 32, 1)"
#   scripts/launch_tpu_pod.sh logs          # follow worker 0's log (process 0 writes metrics)
#   scripts/launch_tpu_pod.sh stop | delete
#
# Every worker runs the same command; JAX finds the other hosts by itself on TPU
# (switch_jax.cli.join_hosts -> jax.distributed.initialize()). Re-running `train` after a
# preemption or `stop` resumes from the latest checkpoint in MODEL_DIR.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR=${ACCELERATOR:-v4-8}
# Runtime images: v4 -> tpu-ubuntu2204-base, v5e -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
# v6e -> v2-alpha-tpuv6e; v3 -> tpu-ubuntu2204-base.
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-switch_jax}
LOG=${LOG:-/tmp/switch_jax_train.log}
GCLOUD=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

on_all() {  # run a shell command on every worker of the slice
  "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    "${GCLOUD[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
      ${SPOT:+--spot}
    ;;
  install)
    # Copy the working tree (not .venv or runs) so every host runs exactly this code.
    tar --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/switch_jax_src.tgz -C "$(dirname "$0")/.." .
    "${GCLOUD[@]}" scp /tmp/switch_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/switch_jax_src.tgz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e '.[tpu,data,metrics]' && \
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  train)
    shift
    : "${MODEL_DIR:?set MODEL_DIR (gs://bucket/run)}"
    args=$(printf ' %q' "$@")
    # nohup: the run survives the ssh session; the same command on every worker.
    on_all "cd $REMOTE_DIR && export NO_GCE_CHECK=false TF_CPP_MIN_LOG_LEVEL=2 && \
      nohup .venv/bin/python -m switch_jax.train --gin.MODEL_DIR=\"'$MODEL_DIR'\" $args \
      > $LOG 2>&1 &"
    echo "started on all workers; follow with: $0 logs"
    ;;
  logs)
    "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=0 --command="tail -f $LOG"
    ;;
  stop)
    # SIGTERM: the trainer saves a checkpoint at an agreed step on every host, then exits 0.
    on_all "pkill -TERM -f 'switch_jax.train' || true"
    ;;
  delete)
    "${GCLOUD[@]}" delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
