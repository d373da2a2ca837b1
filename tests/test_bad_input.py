"""Bad input, one test per row of docs/reliability.md's table: one clear line, nothing lost.

Most rows call the trainer in-process (8 simulated CPU devices, see conftest); the exit codes
and the absence of a traceback are proven on real `python -m switch_jax.train` processes.
Rows that need a committed checkpoint copy one made by a 1-step run and check afterwards that
the checkpoint files are byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from switch_jax.config import gin_config
from switch_jax.models import routing
from switch_jax.models.config import ConfigError
from switch_jax.store import checkpoints, run_settings
from switch_jax.training import trainer

pytest.importorskip("seqio")

from switch_jax.data import DataError, corpus, tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}",
    "TRAIN_STEPS = 1",
    "CHECKPOINT_PERIOD = 1",
    "EVAL_PERIOD = 1000",
    "EVAL_STEPS = 1",
]


def _train(model_dir, *bindings):
    gin_config.parse_gin(["runs/demo.gin"], [f"MODEL_DIR = '{model_dir}'", *SMALL, *bindings])
    configs = gin_config.load_configs()
    return trainer.train(configs, operative_config=gin_config.operative_config())


def _refused(error, match, model_dir, *bindings):
    with pytest.raises(error, match=match) as info:
        _train(model_dir, *bindings)
    message = str(info.value)
    assert "\n" not in message, message  # one line
    return message


def _snapshot(model_dir) -> dict[str, str]:
    root = os.path.join(model_dir, "checkpoints")
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MODEL_DIR of a 1-step run of the tiny model (one committed checkpoint)."""
    model_dir = str(tmp_path_factory.mktemp("trained"))
    _train(model_dir)
    assert os.path.isdir(os.path.join(model_dir, "checkpoints", "1"))
    return model_dir


@pytest.fixture
def resumable(trained, tmp_path):
    """A private copy of `trained`; the test fails if a refusal changed its checkpoints."""
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained, model_dir)
    before = _snapshot(model_dir)
    yield model_dir
    assert _snapshot(model_dir) == before, "a refused run changed a committed checkpoint"


# --- gin and settings -----------------------------------------------------------------------
def test_unknown_gin_macro(tmp_path):
    with pytest.raises(ConfigError, match="unknown gin macro 'TRAIN_STEP'"):
        _train(tmp_path, "TRAIN_STEP = 5")


def test_unknown_gin_parameter(tmp_path):
    with pytest.raises(ConfigError, match="d_modle"):
        _train(tmp_path, "ModelConfig.d_modle = 64")


def test_unknown_gin_file():
    with pytest.raises(ConfigError, match="gin file 'runs/nope.gin' not found"):
        gin_config.parse_gin(["runs/nope.gin"])


def test_wrongly_typed_value(tmp_path):
    _refused(
        ConfigError,
        "TrainConfig.train_steps='ten' .*TRAIN_STEPS.* must be int",
        tmp_path,
        "TRAIN_STEPS = 'ten'",
    )


def test_mesh_that_does_not_match_the_devices(tmp_path):
    _refused(
        ConfigError,
        r"MESH_SHAPE=\(3, 1, 1\) has 3 devices but there are 8",
        tmp_path,
        "MESH_SHAPE = (3, 1, 1)",
    )


def test_experts_not_divisible_by_expert_axis(tmp_path):
    _refused(
        ConfigError,
        r"MoeConfig.num_experts=6 must be divisible by the expert axis \(4\)",
        tmp_path,
        "NUM_EXPERTS = 6",
        "MESH_SHAPE = (2, 4, 1)",
    )


def test_batch_not_divisible_by_data_times_expert(tmp_path):
    _refused(
        ConfigError,
        "BATCH_SIZE=6 must be divisible by data x expert = 8x1",
        tmp_path,
        "BATCH_SIZE = 6",
    )


def test_model_axis_that_does_not_divide_heads(tmp_path):
    _refused(
        ConfigError,
        r"ModelConfig.num_heads=4 must be divisible by the model axis \(8\)",
        tmp_path,
        "MESH_SHAPE = (1, 1, 8)",
    )


def test_group_size_that_cannot_split_the_tokens():
    # In the trainer a batch divisible by data x expert always has a valid grouping; the guard
    # lives where groups are formed, for library callers with other token counts.
    with pytest.raises(ConfigError, match="MoeConfig.group_size"):
        routing.num_groups(10, group_size=4, num_expert_partitions=4)


def test_capacity_factor_not_positive(tmp_path):
    _refused(
        ConfigError,
        "MoeConfig.capacity_factor_train=0.0 must be > 0",
        tmp_path,
        "MoeConfig.capacity_factor_train = 0.0",
    )


def test_sequence_length_zero(tmp_path):
    _refused(
        ConfigError,
        r"TASK_FEATURE_LENGTHS\['inputs'\]=0 must be >= 1",
        tmp_path,
        "TASK_FEATURE_LENGTHS = {'inputs': 0, 'targets': 16}",
    )


def test_model_dir_not_set():
    _refused(ConfigError, "MODEL_DIR is not set", "")


# --- data -----------------------------------------------------------------------------------
def test_unknown_task_name(tmp_path):
    _refused(
        DataError,
        "unknown task or mixture 'c4_span'; did you mean c4_v301_span_corruption",
        tmp_path,
        "MIXTURE_OR_TASK_NAME = 'c4_span'",
    )


def test_missing_tfds_data(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    _refused(
        DataError,
        f"TFDS c4/en:3.0.1 not found in {empty}",
        tmp_path / "run",
        "MIXTURE_OR_TASK_NAME = 'c4_v301_span_corruption'",
        f"TFDS_DATA_DIR = '{empty}'",
    )


def test_unreachable_vocabulary(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("some text\n")
    with pytest.raises(DataError, match="vocabulary /nonexistent/sp.model is unreachable"):
        tasks.register_text_files("bad_vocab", str(text), "/nonexistent/sp.model")


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.py").write_text("")
    with pytest.raises(DataError, match="embedded corpus is empty"):
        corpus.build_corpus(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "cache"))


def test_non_utf8_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    doc = '"""A module docstring long enough to be kept as English prose text here."""\n'
    (tmp_path / "src" / "latin1.py").write_bytes(doc.encode() + b"# caf\xe9\n")
    with pytest.raises(DataError, match="embedded corpus is empty.*skipped"):
        corpus.build_corpus(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "cache"))


def test_text_files_that_match_nothing(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        tasks.register_text_files("none", str(tmp_path / "*.txt"), "/nonexistent/sp.model")


# --- MODEL_DIR and checkpoints --------------------------------------------------------------
def test_model_dir_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    _refused(ConfigError, "MODEL_DIR=.* is a file, not a directory", path)


def test_model_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    _refused(ConfigError, "MODEL_DIR=.* is not writable", tmp_path / "file" / "run")


def test_conflicting_resume(resumable):
    message = _refused(
        ConfigError,
        "holds a run with other settings",
        resumable,
        "ModelConfig.d_model = 64",
        "LEARNING_RATE = 0.5",
    )
    assert "ModelConfig.d_model: 128 -> 64" in message
    assert "OptimizerConfig.learning_rate: 1.0 -> 0.5" in message
    # config.gin still describes the run that is in MODEL_DIR.
    assert "d_model = 128" in open(os.path.join(resumable, "config.gin")).read()


def test_resume_with_only_steps_and_periods_changed_is_allowed(resumable):
    saved = checkpoints.read_meta(os.path.join(resumable, "checkpoints", "1"))["settings"]
    current = dict(saved, **{"TrainConfig.train_steps": 10, "TrainConfig.eval_period": 5})
    run_settings.check_same_run(saved, current, resumable)


def test_resume_of_a_run_saved_before_a_setting_existed(resumable):
    """An upgrade adds settings: a run saved without them resumes at their defaults only."""
    current = checkpoints.read_meta(os.path.join(resumable, "checkpoints", "1"))["settings"]
    assert current["MoeConfig.load_balancing"] == "aux_loss"  # the default
    older = {
        k: v
        for k, v in current.items()
        if k not in ("MoeConfig.load_balancing", "MoeConfig.routing", "TrainConfig.wandb_project")
    }
    run_settings.check_same_run(older, current, resumable)
    changed = dict(current, **{"MoeConfig.load_balancing": "loss_free"})
    with pytest.raises(ConfigError, match="MoeConfig.load_balancing: '<unset>' -> 'loss_free'"):
        run_settings.check_same_run(older, changed, resumable)
    # A setting the saved run had and the new code lacks is still a difference.
    with pytest.raises(ConfigError, match="ModelConfig.gone: 1 -> '<unset>'"):
        run_settings.check_same_run(dict(current, **{"ModelConfig.gone": 1}), current, resumable)


def test_checkpoint_of_another_model_lists_parameters(resumable, tmp_path):
    message = _refused(
        checkpoints.CheckpointError,
        "does not match the model",
        tmp_path / "ft",
        "ModelConfig.d_model = 64",
        f"INIT_CHECKPOINT = '{resumable}'",
    )
    assert "checkpoint (128,) vs model (64,)" in message or "(128" in message


def test_resume_of_another_model_without_saved_settings(trained, tmp_path):
    model_dir = str(tmp_path / "old")
    shutil.copytree(trained, model_dir)
    meta = os.path.join(model_dir, "checkpoints", "1", "meta", "metadata")
    saved = checkpoints.read_meta(os.path.dirname(os.path.dirname(meta)))
    del saved["settings"]  # as written before settings were saved with each checkpoint
    with open(meta, "w") as f:
        json.dump(saved, f)
    before = _snapshot(model_dir)
    message = _refused(
        checkpoints.CheckpointError, "does not match the model", model_dir, "NUM_EXPERTS = 4"
    )
    assert "mlp/wo/value: checkpoint (8, 512, 128) vs model (4, 512, 128)" in message
    assert _snapshot(model_dir) == before


def test_corrupt_checkpoint_is_named_and_kept(trained, tmp_path):
    model_dir = str(tmp_path / "corrupt")
    shutil.copytree(trained, model_dir)
    state = os.path.join(model_dir, "checkpoints", "1", "state")
    victim = max(
        (os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs), key=os.path.getsize
    )
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    before = _snapshot(model_dir)
    message = _refused(
        checkpoints.CheckpointError, "cannot restore checkpoint .*checkpoints/1", model_dir
    )
    assert _snapshot(model_dir) == before  # not deleted, not rewritten
    # TensorStore's spec repr (hundreds of characters) is cut: the path and the advice remain.
    assert "<bound method" not in message and "TensorStore" not in message, message
    assert len(message) - len(model_dir) < 200, message
    # eval refuses it too, and leaves no event files behind in the run.
    tree = _tree(model_dir)
    gin_config.parse_gin(["runs/demo.gin"], [f"MODEL_DIR = '{model_dir}'", *SMALL])
    with pytest.raises(checkpoints.CheckpointError, match="a saved array is unreadable"):
        trainer.evaluate_checkpoints(gin_config.load_configs())
    assert _tree(model_dir) == tree


def _tree(root) -> list[str]:
    """Every path under `root` with its size: what a refused command must leave as it was."""
    return sorted(
        f"{os.path.relpath(os.path.join(d, f), root)}:{os.path.getsize(os.path.join(d, f))}"
        for d, _, files in os.walk(root)
        for f in files
    )


def test_out_of_space(resumable, monkeypatch):
    usage = shutil.disk_usage(resumable)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
    _refused(ConfigError, "has 1 MiB free but checkpoints need", resumable, "TRAIN_STEPS = 2")
    assert not os.path.isdir(os.path.join(resumable, "checkpoints", "2"))


# --- real processes: exit codes, one line, no traceback ----------------------------------------
@pytest.mark.parametrize(
    "binding, code, last_line",
    [
        ("--gin.TRAIN_STEP=5", 2, "ConfigError: unknown gin macro 'TRAIN_STEP'"),
        ("--gin.MIXTURE_OR_TASK_NAME=nope", 1, "DataError: unknown task or mixture 'nope'"),
    ],
)
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, binding, code, last_line):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    cmd = [
        sys.executable,
        "-m",
        "switch_jax.train",
        "--gin_file=runs/demo.gin",
        f"--gin.MODEL_DIR={tmp_path}",
        "--gin.BATCH_SIZE=8",
        binding,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == code, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith(last_line)
