#!/usr/bin/env bash
# README command 1: set up .venv, install switch_jax with its data extra, then train a small
# Switch encoder-decoder on the embedded corpus (CPU, ~10 minutes). Run it again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "data,metrics,plot"
export NO_GCE_CHECK=true TF_CPP_MIN_LOG_LEVEL=2
MODEL_DIR=${MODEL_DIR:-runs/demo}
.venv/bin/python -m switch_jax.train \
  --gin_file=runs/demo.gin \
  --gin.MODEL_DIR="'${MODEL_DIR}'" "$@"
# PNGs of the run (loss, learning rate, tokens/s, expert load per layer, dropped tokens).
.venv/bin/python -m switch_jax.plot "${MODEL_DIR}"
