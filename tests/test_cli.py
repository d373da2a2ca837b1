"""The shared entry module: every console script imports side by side, errors are one line."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_imports_in_one_process():
    # Tests (and tools) import several entry modules at once: no DuplicateFlagError.
    for name, target in SCRIPTS.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    assert {"switch-train", "switch-eval", "switch-info", "switch-bench"} <= set(SCRIPTS)


def test_define_flag_returns_the_existing_flag():
    first = cli.define_flag(flags.DEFINE_integer, "test_cli_flag", 3, "first")
    again = cli.define_flag(flags.DEFINE_integer, "test_cli_flag", 5, "second")
    flags.FLAGS.mark_as_parsed()
    assert first.value == again.value == 3


@pytest.mark.parametrize(
    "args, status, first_words",
    [
        (["--gin.TRAIN_STEPZ=3"], 2, "ConfigError: unknown gin macro 'TRAIN_STEPZ'"),
        (["--gin.MODEL_DIR"], 2, "ConfigError: --gin.MODEL_DIR needs a value"),
        (["--gin_file=models/nope.gin"], 2, "ConfigError: gin file 'models/nope.gin' not found"),
        # absl's "Pass --helpshort or --helpfull" must not be the last line: the flag is.
        (
            ["--topology=v5p-8"],
            2,
            "ConfigError: unknown flag --topology: it is a flag of switch-com",
        ),
        (["--num_devices=0"], 2, "ConfigError: flag --num_devices=0: 0 is not a positive integer"),
        (
            ["--compile_cache_dir=/tmp/x"],  # info compiles nothing worth keeping
            2,
            "ConfigError: unknown flag --compile_cache_dir: it is a flag of switch-eval",
        ),
    ],
)
def test_user_errors_are_one_line_with_status(args, status, first_words):
    out = subprocess.run(
        [sys.executable, "-m", "switch_jax.info", "--gin_file=models/tiny.gin", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == status, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(first_words), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_model_dir_binding_may_be_bare_or_quoted():
    from switch_jax.store.stored_config import model_dir_of

    assert model_dir_of(["MODEL_DIR=/tmp/run"]) == "/tmp/run"  # as gin takes it
    assert model_dir_of(["MODEL_DIR=imported"]) == "imported"
    assert model_dir_of(["MODEL_DIR='gs://b/run'", "BATCH_SIZE=8"]) == "gs://b/run"
    with pytest.raises(ConfigError, match="must be a quoted string"):
        model_dir_of(["MODEL_DIR=a b"])


@pytest.mark.parametrize(
    "command, own_flag", [("infer", "--input_file"), ("train", "--compile_cache_dir")]
)
def test_help_shows_the_command_its_flags_and_gin(command, own_flag):
    # A console script's __main__ has no docstring: absl's --help would print only "USAGE".
    code = f"import sys; from switch_jax.{command} import console_main; console_main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-2000:]  # absl's --help exits 1
    assert f"python -m switch_jax.{command}" in done.stdout
    assert "--gin_file=F" in done.stdout and "--coordinator_address" in done.stdout
    assert f"Flags of switch-{command}:" in done.stdout and own_flag in done.stdout
