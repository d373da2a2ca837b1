"""End to end: train the tiny config on the embedded corpus, stop, resume, change mesh."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from switch_jax.config import gin_config
from switch_jax.training import trainer

pytest.importorskip("seqio")

STEPS = 6
HALF = 3


def _configs(model_dir, **overrides):
    bindings = [
        f"MODEL_DIR = '{model_dir}'",
        f"TRAIN_STEPS = {overrides.pop('steps', STEPS)}",
        f"PROFILE_STEPS = {overrides.pop('profile', None)}",
        "BATCH_SIZE = 8",
        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}",
        f"MESH_SHAPE = {overrides.pop('mesh', (2, 2, 2))}",
        f"CHECKPOINT_PERIOD = {HALF}",
        "EVAL_PERIOD = 1000",
        "EVAL_STEPS = 1",
        "LOG_PERIOD = 1",
    ]
    gin_config.parse_gin(["runs/demo.gin"], bindings, [])
    return gin_config.load_configs()


def _train(model_dir, **overrides):
    trainer.train(_configs(model_dir, **overrides), operative_config=gin_config.operative_config())


def _losses(model_dir) -> dict[int, float]:
    path = os.path.join(model_dir, "train", "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    _train(model_dir, profile=(2, 3))  # a profiler trace must not change the losses
    return _losses(model_dir), model_dir


def test_profile_steps_write_a_trace(uninterrupted):
    profile = os.path.join(uninterrupted[1], "train", "profile")
    traces = glob.glob(os.path.join(profile, "**", "*.xplane.pb"), recursive=True)
    assert traces, "PROFILE_STEPS=(2, 3) wrote no jax.profiler trace"


def test_resume_continues_exactly(uninterrupted, tmp_path, monkeypatch):
    uninterrupted = uninterrupted[0]
    monkeypatch.chdir(tmp_path)
    model_dir = "resumed"  # relative, as users type it
    _train(model_dir, steps=HALF)
    assert sorted(_losses(model_dir)) == list(range(1, HALF + 1))
    _train(model_dir)  # the same command again, now with the full step count
    resumed = _losses(model_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    steps = list(range(1, STEPS + 1))
    np.testing.assert_array_equal([resumed[s] for s in steps], [uninterrupted[s] for s in steps])
    assert uninterrupted[STEPS] < uninterrupted[1]
    for name in ("config.gin", "model-info.txt"):
        assert os.path.exists(os.path.join(model_dir, name))


def test_resume_onto_another_mesh(uninterrupted, tmp_path):
    uninterrupted = uninterrupted[0]
    model_dir = str(tmp_path / "remeshed")
    _train(model_dir, steps=HALF)
    # Same data x expert product, so MoE groups (and routing) are unchanged by the move.
    _train(model_dir, mesh=(1, 4, 2))
    resumed = _losses(model_dir)
    later = list(range(HALF + 1, STEPS + 1))
    # Another mesh changes reduction order only: equal up to float rounding.
    np.testing.assert_allclose(
        [resumed[s] for s in later], [uninterrupted[s] for s in later], rtol=2e-4
    )
