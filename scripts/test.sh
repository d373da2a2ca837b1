#!/usr/bin/env bash
# README command 2: set up .venv, install switch_jax with the extras its tests exercise (test,
# data, metrics, convert, plot, and tpu: libtpu for the ahead-of-time TPU compile test), run them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "test,data,metrics,convert,plot,tpu"
.venv/bin/python -m ruff check switch_jax tests scripts
exec .venv/bin/python -m pytest -q "$@"
