"""A MODEL_DIR's stored operative config (config.gin), read first by eval and infer, so that
`--gin.MODEL_DIR=D` alone gives the model, task and vocabulary the run was trained with; any
--gin_file / --gin.NAME given as well is parsed after it and wins."""

from __future__ import annotations

import ast
import os
import re
import tempfile
from collections.abc import Sequence

from etils import epath

from switch_jax.config.gin_config import BARE_STRING
from switch_jax.models.config import ConfigError

_MODEL_DIR = re.compile(r"^\s*MODEL_DIR\s*=\s*(.+)$", re.S)


def model_dir_of(bindings: Sequence[str]) -> str | None:
    """The MODEL_DIR given as a gin binding (--gin.MODEL_DIR=...), the last one winning."""
    value = None
    for binding in bindings:
        match = _MODEL_DIR.match(binding)
        if match:
            text = match.group(1).strip()
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                if BARE_STRING.match(text):  # --gin.MODEL_DIR=/tmp/run: a string, as for gin
                    value = text
                    continue
                raise ConfigError(
                    f"--gin.MODEL_DIR={match.group(1).strip()} must be a quoted string, e.g. "
                    "--gin.MODEL_DIR=\"'/path/to/run'\""
                ) from None
    return value or None


def stored_config_files(bindings: Sequence[str]) -> list[str]:
    """[local path of MODEL_DIR/config.gin] when MODEL_DIR is bound and has one, else []."""
    model_dir = model_dir_of(bindings)
    if not model_dir:
        return []
    stored = epath.Path(model_dir) / "config.gin"
    if not stored.exists():
        return []
    if "://" not in os.fspath(stored):
        return [os.path.abspath(os.fspath(stored))]
    # gin reads local files only: copy a gs:// config next to nothing else.
    local = tempfile.NamedTemporaryFile("w", suffix="_config.gin", delete=False)
    with local:
        local.write(stored.read_text())
    return [local.name]
