"""store/model_dir.py (the MODEL_DIR layout) and store/stored_config.py (reading config.gin)."""

from __future__ import annotations

import dataclasses
import os

import gin
import pytest

from switch_jax.config import gin_config
from switch_jax.models.config import ConfigError
from switch_jax.store import model_dir as model_dir_lib
from switch_jax.store import stored_config


def test_layout_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # What users, docs and TensorBoard rely on: changing a name breaks every existing MODEL_DIR.
    assert os.fspath(model_dir_lib.config_file("run")) == "run/config.gin"
    assert os.fspath(model_dir_lib.info_file("run")) == "run/model-info.txt"
    assert os.fspath(model_dir_lib.lease_file("run")) == "run/trainer.lease"
    assert os.fspath(model_dir_lib.metrics_file("run", "train")) == "run/train/metrics.jsonl"
    assert os.fspath(model_dir_lib.metrics_file("run", "eval")) == "run/eval/metrics.jsonl"
    assert os.fspath(model_dir_lib.profile_dir("run")) == "run/train/profile"
    assert os.fspath(model_dir_lib.plots_dir("run")) == "run/plots"
    # Orbax refuses relative paths: checkpoint paths are absolute, URLs stay as given.
    assert os.fspath(model_dir_lib.checkpoints_dir("run")) == f"{tmp_path}/run/checkpoints"
    step = model_dir_lib.step_dir("run", 7)
    assert os.fspath(step) == f"{tmp_path}/run/checkpoints/7"
    assert os.fspath(model_dir_lib.state_dir(step)) == f"{tmp_path}/run/checkpoints/7/state"
    assert os.fspath(model_dir_lib.meta_file(step)).endswith("checkpoints/7/meta/metadata")
    assert os.fspath(model_dir_lib.model_dir_of_step(step)) == f"{tmp_path}/run"
    assert os.fspath(model_dir_lib.step_dir("gs://b/run", 7)) == "gs://b/run/checkpoints/7"


def _committed(model_dir, *names):
    for name in names:
        os.makedirs(os.path.join(model_dir, "checkpoints", name, "state"))


def test_resolve_step_dir(tmp_path, monkeypatch):
    _committed(tmp_path / "run", "1", "10", "3", "12.orbax-checkpoint-tmp-5")
    latest = os.fspath(tmp_path / "run" / "checkpoints" / "10")
    assert os.fspath(model_dir_lib.resolve_step_dir(tmp_path / "run")) == latest
    assert os.fspath(model_dir_lib.resolve_step_dir(tmp_path / "run" / "checkpoints")) == latest
    three = tmp_path / "run" / "checkpoints" / "3"
    assert os.fspath(model_dir_lib.resolve_step_dir(three)) == os.fspath(three)
    monkeypatch.chdir(tmp_path)
    assert os.fspath(model_dir_lib.resolve_step_dir("run")) == latest
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for empty in ("empty", "missing"):
        with pytest.raises(ConfigError, match=f"{tmp_path}/{empty} holds no committed checkpoint"):
            model_dir_lib.resolve_step_dir(empty)


def test_ensure_writable(tmp_path):
    made = model_dir_lib.ensure_writable(str(tmp_path / "a" / "b"))
    assert made.is_dir() and os.listdir(made) == []  # the write probe is gone
    with pytest.raises(ConfigError, match="MODEL_DIR is not set"):
        model_dir_lib.ensure_writable("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        model_dir_lib.ensure_writable(str(tmp_path / "file"))


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = model_dir_lib.config_file(tmp_path)
    model_dir_lib.write_atomic(path, "old\n")
    model_dir_lib.write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["config.gin"]
    (tmp_path / ".config.gin.tmp").mkdir()  # the temporary file cannot be written
    with pytest.raises(OSError):
        model_dir_lib.write_atomic(path, "lost\n")
    assert path.read_text() == "new\n"


@dataclasses.dataclass
class _Info:
    total_params: int = 1234567
    flops_per_token: float = 0.000123456

    def as_dict(self):
        return dataclasses.asdict(self)


def test_write_run_files(tmp_path):
    model_dir_lib.write_run_files(tmp_path, "A = 1\n", _Info(), dispatch="scatter")
    info = "total_params: 1,234,567\nflops_per_token: 0.0001235\nmoe_dispatch: scatter\n"
    assert (tmp_path / "model-info.txt").read_text() == info
    assert (tmp_path / "config.gin").read_text() == "A = 1\n"
    model_dir_lib.write_run_files(tmp_path, "", _Info())  # no operative config: keep the old one
    assert (tmp_path / "config.gin").read_text() == "A = 1\n"
    assert "moe_dispatch" not in (tmp_path / "model-info.txt").read_text()
    assert sorted(os.listdir(tmp_path)) == ["config.gin", "model-info.txt"]


def test_stored_config_files(tmp_path):
    run = tmp_path / "run"
    assert stored_config.stored_config_files([f"MODEL_DIR = '{run}'"]) == []
    run.mkdir()
    (run / "config.gin").write_text("")
    assert stored_config.stored_config_files([f"MODEL_DIR = '{run}'"]) == [f"{run}/config.gin"]
    assert stored_config.stored_config_files(["TRAIN_STEPS = 3"]) == []


def test_read_model_config_leaves_the_callers_gin_untouched(tmp_path):
    gin_config.parse_gin(["models/switch_base_8.gin"], ["MODEL_DIR = 'teacher'"], [])
    stored = gin_config.load_configs().model
    (tmp_path / "config.gin").write_text(gin_config.operative_config())

    gin_config.parse_gin(["models/tiny.gin"], ["MODEL_DIR = 'student'"], [])
    own = gin_config.load_configs()
    before = (gin.config_str(), gin_config.operative_config())
    read = stored_config.read_model_config(str(tmp_path), setting="TEACHER_MODEL_DIR")
    assert read == stored and read != own.model
    assert (gin.config_str(), gin_config.operative_config()) == before
    assert gin_config.load_configs() == own


def test_read_model_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=f"TEACHER_MODEL_DIR={tmp_path} has no config.gin"):
        stored_config.read_model_config(str(tmp_path), setting="TEACHER_MODEL_DIR")
    (tmp_path / "config.gin").write_text("ModelConfig.d_modl = 3\n")
    with pytest.raises(ConfigError, match=f"MODEL_DIR={tmp_path}: its config.gin fails: .*d_modl"):
        stored_config.read_model_config(str(tmp_path))
