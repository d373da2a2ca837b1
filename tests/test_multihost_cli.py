"""`python -m switch_jax.train` itself as 2 processes x 4 CPU devices, joined by its host flags.

The same run as 1 process x 8 devices (in this test process) gives the same losses; only
process 0 writes metrics and TensorBoard; the checkpoint restores in a single process.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from process_group import run_all, two_process_train

from switch_jax.config import gin_config
from switch_jax.store import checkpoints
from switch_jax.training import build, trainer

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
BINDINGS = [
    f"TRAIN_STEPS = {STEPS}",
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
    "MESH_SHAPE = (2, 2, 2)",
    "HOST_INPUT = 'global'",  # the same global batches whatever the number of processes
    f"CHECKPOINT_PERIOD = {STEPS}",
    "EVAL_STEPS = 0",
    "LOG_PERIOD = 1",
]


def _metrics(model_dir) -> list[dict]:
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _two_process_run(model_dir: str) -> list[str]:
    args = [f"--gin.{b.replace(' = ', '=')}" for b in [f"MODEL_DIR = '{model_dir}'", *BINDINGS]]
    commands, env = two_process_train(args, repo=REPO)
    outputs = run_all(commands, env=env, timeout=420, cwd=REPO)
    return outputs


@pytest.mark.slow
def test_train_cli_on_two_processes_matches_one(tmp_path):
    multi_dir, single_dir = str(tmp_path / "two"), str(tmp_path / "one")
    outputs = _two_process_run(multi_dir)
    assert "process 0/2: 4 local / 8 global cpu devices" in outputs[0]

    gin_config.parse_gin(["runs/demo.gin"], [f"MODEL_DIR = '{single_dir}'", *BINDINGS])
    configs = gin_config.load_configs()
    trainer.train(configs)

    multi, single = _metrics(multi_dir), _metrics(single_dir)
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))  # one writer, no duplicates
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
    assert len(glob.glob(os.path.join(multi_dir, "train", "events.out.tfevents.*"))) == 1

    # The two-process checkpoint restores here, in one process, onto the same 8-device mesh.
    run = build.build_run(configs)
    restored = {}
    for name, model_dir in (("multi", multi_dir), ("single", single_dir)):
        ckpts = checkpoints.Checkpoints(model_dir, period=STEPS, keep=1, async_save=False)
        assert ckpts.latest_step() == STEPS
        with run.partitioner.activate():
            state, meta = ckpts.restore(STEPS, run.setup.abstract_state)
        ckpts.close()
        assert meta["step"] == STEPS and int(state.step) == STEPS
        restored[name] = jax.tree.leaves(jax.device_get(state.params))
    for a, b in zip(restored["multi"], restored["single"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
