"""The commands' persistent compilation cache: a second run loads its train step, an entry
truncated by a killed writer is replaced, and a folder that cannot be made is one line."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import jax
import pytest

from switch_jax.models.config import ConfigError
from switch_jax.parallel import compile_cache

pytest.importorskip("seqio")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model_dir, cache_dir) -> tuple[str, float]:
    """One step of the tiny demo in its own process: (output, its step-1 loss)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "NO_GCE_CHECK": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop(compile_cache.ENV, None)  # the flag alone decides
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "switch_jax.train",
            "--gin_file=runs/demo.gin",
            f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TRAIN_STEPS=1",
            "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            "--gin.EVAL_PERIOD=1000",
            "--gin.EVAL_STEPS=1",
            "--gin.LOG_PERIOD=1",
            f"--compile_cache_dir={cache_dir}",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out, float(re.search(r"step 1/1 \| loss ([0-9.]+)", out).group(1))


def test_a_second_run_loads_its_step_and_a_truncated_entry_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    cold, loss = _train(tmp_path / "a", cache)
    assert "from the compile cache" not in cold
    steps = glob.glob(str(cache / "jit_step_fn-*-cache"))
    assert len(steps) == 1, os.listdir(cache)

    warm, warm_loss = _train(tmp_path / "b", cache)
    assert re.search(r"compiling the train step… done in \S+ \(from the compile cache\)", warm)
    assert warm_loss == loss

    size = os.path.getsize(steps[0])
    with open(steps[0], "r+b") as f:  # as a writer killed mid-write leaves it
        f.truncate(size // 3)
    broken, broken_loss = _train(tmp_path / "c", cache)
    assert "an unreadable entry of jit_step_fn" in broken and "Traceback" not in broken
    assert broken_loss == loss
    # The step compiled again was stored in its place (JAX alone keeps the truncated file).
    (stored,) = glob.glob(str(cache / "jit_step_fn-*-cache"))
    assert os.path.getsize(stored) > size // 3


def test_cache_folder_default_off_and_unwritable(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "from_env"))
    assert compile_cache.default_dir() == str(tmp_path / "from_env")
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("SWITCH_JAX_CACHE", str(tmp_path / "root"))
    assert compile_cache.default_dir() == str(tmp_path / "root" / "jax")

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create it"):
        compile_cache.enable(str(blocker / "cache"))

    before = jax.config.jax_enable_compilation_cache
    try:
        assert compile_cache.enable("") is None
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def test_only_a_file_that_does_not_decompress_is_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compile_cache, "_directory", str(tmp_path))
    names = ["jit_step_fn-ab-cache", "jit_step_fn-ab-atime", "jit_step_fn_other-cd-cache"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    passed_on = []
    show = compile_cache._replacing_unreadable(lambda *a, **k: passed_on.append(str(a[0])))
    prefix = "Error reading persistent compilation cache entry for 'jit_step_fn': "

    # Loading refused by the runtime (a compile-only client, say): the file is kept.
    show(UserWarning(prefix + "JaxRuntimeError: INVALID_ARGUMENT: ..."), UserWarning, "f", 1)
    assert len(passed_on) == 1 and sorted(os.listdir(tmp_path)) == sorted(names)
    # Cut short: zlib's error. That program's entries go, another program's stay.
    show(UserWarning(prefix + "error: Error -5 while decompressing data"), UserWarning, "f", 1)
    assert os.listdir(tmp_path) == ["jit_step_fn_other-cd-cache"]
    assert "an unreadable entry of jit_step_fn" in capsys.readouterr().err
    show(UserWarning("something else"), UserWarning, "f", 1)
    assert passed_on[-1] == "something else"
