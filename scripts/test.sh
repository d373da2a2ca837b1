#!/usr/bin/env bash
# README command 2: set up .venv, install switch_jax with the extras its tests exercise (test,
# data, metrics, convert, plot, tpu: libtpu for the ahead-of-time TPU compile test, and wandb:
# offline Weights & Biases logging), run them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "test,data,metrics,convert,plot,tpu,wandb"
.venv/bin/python -m ruff check switch_jax tests scripts
# Two workers, each taking whole test files (module fixtures stay in one process): ~1.6x faster
# than one process on the 2-core machine, where a single process leaves a core idle through
# compiles and subprocess start-ups. Pass -n 0 to run in one process.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
