"""Reading a MODEL_DIR's stored operative config (config.gin).

eval and infer parse it first, so that `--gin.MODEL_DIR=D` alone gives the model, task and
vocabulary the run was trained with; any --gin_file / --gin.NAME given as well is parsed after it
and wins. `read_model_config` reads the ModelConfig of another MODEL_DIR (a distillation
teacher) without touching this process's gin config.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from switch_jax.config import gin_config
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
from switch_jax.store import model_dir as model_dir_lib

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
                if gin_config.BARE_STRING.match(text):  # --gin.MODEL_DIR=/tmp/run: a string
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
    stored = model_dir_lib.config_file(model_dir)
    if not stored.exists():
        return []
    if "://" not in os.fspath(stored):
        return [os.path.abspath(os.fspath(stored))]
    # gin reads local files only: copy a gs:// config next to nothing else.
    local = tempfile.NamedTemporaryFile("w", suffix="_config.gin", delete=False)
    with local:
        local.write(stored.read_text())
    return [local.name]


def read_model_config(model_dir: str, *, setting: str = "MODEL_DIR") -> ModelConfig:
    """The ModelConfig that MODEL_DIR/config.gin describes (a run's or a conversion's).

    Parsed in a child process (`python -m switch_jax.store.stored_config FILE`): gin's state is
    global, and this process's gin holds the caller's run, which must stay as it is (it becomes
    that run's operative config).

    Args:
      model_dir: the MODEL_DIR to read.
      setting: the gin macro that named `model_dir`, for the messages (e.g. TEACHER_MODEL_DIR).

    Raises:
      ConfigError: MODEL_DIR has no config.gin, or it does not parse.
    """
    stored = model_dir_lib.config_file(model_dir)
    name = model_dir_lib.CONFIG_GIN
    if not stored.exists():
        raise ConfigError(f"{setting}={model_dir} has no {name} (not a MODEL_DIR?)")
    with tempfile.TemporaryDirectory() as tmp:  # a local copy: gin reads local files only
        local = os.path.join(tmp, name)
        with open(local, "w") as f:
            f.write(stored.read_text())
        command = [sys.executable, "-m", "switch_jax.store.stored_config", local]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise ConfigError(f"{setting}={model_dir}: its {name} fails: {last}")
    return _model_config_from_json(done.stdout.strip().splitlines()[-1])


def model_config_json(gin_file: str) -> str:
    """JSON of the ModelConfig that `gin_file` gives (the child side of `read_model_config`;
    it replaces this process's gin config)."""
    gin_config.parse_gin([gin_file], finalize=False)
    return json.dumps(dataclasses.asdict(gin_config.load_configs().model))


def _model_config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    moe = fields.pop("moe")
    return ModelConfig(**fields, moe=MoeConfig(**moe) if moe else None)


if __name__ == "__main__":
    print(model_config_json(sys.argv[1]))
