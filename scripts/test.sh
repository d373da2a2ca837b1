#!/usr/bin/env bash
# README command 2: set up .venv, install switch_jax with its test and data extras, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "test,data,metrics,convert"
.venv/bin/python -m ruff check switch_jax tests scripts
exec .venv/bin/python -m pytest -q "$@"
