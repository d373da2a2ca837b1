#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: make .venv (once) and install switch_jax with the given extras.
# Usage: source scripts/venv.sh "data,metrics"
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# setuptools too: a new venv has an older one than pyproject.toml builds with, and the wheel test
# builds without isolation.
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77"
.venv/bin/python -m pip install -q -e ".[$1]"
