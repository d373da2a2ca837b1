#!/usr/bin/env bash
# README command 2: create .venv, install switch_jax with its test and data extras, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,data,metrics]"
.venv/bin/python -m ruff check switch_jax tests scripts
exec .venv/bin/python -m pytest -q "$@"
