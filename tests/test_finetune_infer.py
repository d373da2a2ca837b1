"""End to end: pre-train a tiny Switch model on a copy task, fine-tune it with runs/finetune.gin,
decode held-out inputs through `python -m switch_jax.infer` and evaluate with task metrics."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("seqio")

from switch_jax.config import gin_config  # noqa: E402
from switch_jax.decode import inference  # noqa: E402
from switch_jax.training import trainer  # noqa: E402
from tests import copy_task  # noqa: E402

pytestmark = pytest.mark.slow

PRETRAIN_STEPS, FINETUNE_STEPS = 30, 200
# A 4-expert, d_model 64 Switch encoder-decoder over the 32 ids of the copy task; the task
# module is imported by gin, as a user's task module would be.
MODEL_GIN = """
import tests.copy_task
include 'models/tiny.gin'
VOCAB_SIZE = 32
NUM_EXPERTS = 4
MoeConfig.group_size = 64
ModelConfig.d_model = 64
ModelConfig.d_ff = 128
ModelConfig.head_dim = 16
"""
RUN = [
    "MIXTURE_OR_TASK_NAME = 'copy_ids'",
    "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}",
    "BATCH_SIZE = 128",
    "MESH_SHAPE = (2, 2, 2)",  # decoding in the trainer's eval runs sharded too
    "EVAL_STEPS = 1",
    "LOG_PERIOD = 10",
]


def _train(files, bindings):
    gin_config.parse_gin(files, bindings, [])
    trainer.train(gin_config.load_configs(), operative_config=gin_config.operative_config())


def _eval_rows(model_dir):
    with open(os.path.join(model_dir, "eval", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_gin = root / "copy_model.gin"
    model_gin.write_text(MODEL_GIN)
    pre, fine = str(root / "pretrain"), str(root / "finetune")
    _train(
        [str(model_gin)],
        [
            *RUN,
            f"MODEL_DIR = '{pre}'",
            f"TRAIN_STEPS = {PRETRAIN_STEPS}",
            "LR_SCHEDULE = 'constant'",
            "LEARNING_RATE = 0.05",
            f"CHECKPOINT_PERIOD = {PRETRAIN_STEPS}",
            f"EVAL_PERIOD = {PRETRAIN_STEPS}",
        ],
    )
    # The paper's fine-tuning recipe (dropout 0.1, expert dropout 0.4, constant learning rate),
    # T5X-style continuation of step and optimizer state; a larger rate for a 200-step run.
    _train(
        [str(model_gin), "runs/finetune.gin"],
        [
            *RUN,
            f"MODEL_DIR = '{fine}'",
            f"INIT_CHECKPOINT = '{pre}'",
            "INIT_RESTORE = 'all'",
            f"TRAIN_STEPS = {PRETRAIN_STEPS + FINETUNE_STEPS}",
            "LEARNING_RATE = 0.05",
            "CHECKPOINT_PERIOD = 1000",
            "EVAL_PERIOD = 1000",
        ],
    )
    return pre, fine, root


def test_finetuning_improves_the_task_metric_over_the_starting_checkpoint(runs):
    pre, fine, _ = runs
    before, after = _eval_rows(pre)[-1], _eval_rows(fine)[-1]
    assert before["step"] == PRETRAIN_STEPS and after["step"] == PRETRAIN_STEPS + FINETUNE_STEPS
    print(f"copy_ids exact match: {before['copy_ids/exact_match']} -> "
          f"{after['copy_ids/exact_match']}")  # fmt: skip
    assert after["copy_ids/exact_match"] >= before["copy_ids/exact_match"] + 50
    assert after["copy_ids/exact_match"] >= 70  # chance: ~0
    assert after["decode/tokens_per_second"] > 0
    with open(os.path.join(fine, "train", "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["step"] > PRETRAIN_STEPS  # INIT_RESTORE='all': the step continued


def _infer_cli(*args: str, model_dir: str):
    """`python -m switch_jax.infer` on one CPU device (the run was trained on a (2, 2, 2) mesh:
    restore reshards)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [
        sys.executable,
        "-m",
        "switch_jax.infer",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin_file=runs/infer.gin",
        "--gin.MESH_SHAPE=(1, 1, 1)",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_infer_decodes_held_out_inputs_from_model_dir_alone(runs):
    _, fine, root = runs
    held_out = copy_task.sequences("validation")[:16]
    inputs = root / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": s, "targets": s}) + "\n" for s in held_out))
    out = root / "predictions.jsonl"
    done = _infer_cli(f"--input_file={inputs}", f"--output_file={out}", model_dir=fine)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["inputs"] for r in rows] == held_out
    correct = sum(r["prediction"] == r["targets"] for r in rows)
    assert correct >= 12, rows  # well above chance (~0)
    # Scoring the same targets gives their log-likelihood: for a correct greedy output, the
    # log_prob the decoder reported (bfloat16 activations: cached steps vs one full pass).
    gin_config.parse_gin([os.path.join(fine, "config.gin"), "runs/infer.gin"], [], [])
    configs = gin_config.load_configs()
    scores = io.StringIO()
    inference.infer(configs, rows, scores, mode="score", progress=None)
    scored = [json.loads(line) for line in scores.getvalue().splitlines()]
    for r, s in zip(rows, scored, strict=True):
        assert s["log_likelihood"] <= 0
        if r["prediction"] == r["targets"]:
            assert abs(s["log_likelihood"] - r["log_prob"]) < 0.05


def test_infer_bad_input_is_one_line(runs, tmp_path):
    _, fine, _ = runs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": [3, 4]}\n{"targets": "x"}\n')
    done = _infer_cli(f"--input_file={bad}", model_dir=fine)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("InputError: ")
    assert "line 2" in done.stderr
