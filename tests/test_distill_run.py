"""End to end: runs/distill.gin trains the dense twin of a Switch teacher from its MODEL_DIR."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from switch_jax.config import gin_config
from switch_jax.models.config import ConfigError
from switch_jax.store import checkpoints, stored_config
from switch_jax.training import build, distill, steps, trainer

pytest.importorskip("seqio")

SMALL = [  # the demo's layout (layer 1 of each stack a Switch layer), smaller shapes
    "ModelConfig.d_model = 32",
    "ModelConfig.d_ff = 64",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16",
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
    "MESH_SHAPE = (2, 2, 2)",
    "EVAL_STEPS = 0",
    "LOG_PERIOD = 1",
]


def _parse(files, bindings):
    gin_config.parse_gin(["runs/demo.gin", *files], [*SMALL, *bindings], [])
    return gin_config.load_configs()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A Switch MODEL_DIR (config.gin + a checkpoint), initialised with another seed."""
    model_dir = str(tmp_path_factory.mktemp("teacher"))
    configs = _parse([], [f"MODEL_DIR = '{model_dir}'", "SEED = 7"])
    with open(f"{model_dir}/config.gin", "w") as f:
        f.write(gin_config.operative_config())
    run = build.build_run(configs)
    ckpts = run.checkpoints(async_save=False)
    with run.partitioner.activate():
        ckpts.save(0, run.setup.init_state(), force=True)
    ckpts.close()
    return model_dir


def test_distill_gin_trains_the_dense_twin_from_the_teacher(teacher_dir, tmp_path):
    student_dir = str(tmp_path / "student")
    bindings = [
        f"MODEL_DIR = '{student_dir}'",
        f"TEACHER_MODEL_DIR = '{teacher_dir}'",
        "TRAIN_STEPS = 2",
        "LR_SCHEDULE = 'constant'",
        "LEARNING_RATE = 1e-7",  # the copied weights stay where the teacher put them
    ]
    configs = _parse(["runs/distill.gin"], bindings)
    assert configs.model.moe is None and configs.distill.soft_weight == 0.25
    last = trainer.train(configs, operative_config=gin_config.operative_config())
    mixed = 0.25 * last["soft_cross_entropy"] + 0.75 * last["cross_entropy"]
    assert last["objective"] == pytest.approx(mixed, rel=1e-5)
    assert last["loss"] == pytest.approx(last["objective"] + last["z_loss"], rel=1e-5)

    # The student's own config.gin describes the dense student (what eval / a later run reads).
    student_cfg = stored_config.read_model_config(student_dir)
    assert student_cfg == configs.model
    teacher_cfg = stored_config.read_model_config(teacher_dir)
    assert teacher_cfg.moe is not None and teacher_cfg.d_model == 32
    run = build.build_run(configs)
    with run.partitioner.activate():
        ckpts = run.checkpoints()
        state, _ = ckpts.restore(2, run.setup.abstract_state)
        ckpts.close()
    t_abstract = steps.abstract_train_state(teacher_cfg, configs.optimizer, run.partitioner)
    with run.partitioner.activate():
        teacher_params = checkpoints.restore_params(teacher_dir, t_abstract.state.params)
    host_student, host_teacher = jax.device_get((state.params, teacher_params))
    _, report = distill.init_from_teacher(host_student, host_teacher, configs.model, teacher_cfg)
    student = distill.per_layer(host_student, configs.model)
    teacher = distill.per_layer(host_teacher, teacher_cfg)
    assert len(report.copied) > 20
    for name in report.copied:
        np.testing.assert_allclose(student[name], teacher[name], rtol=1e-4, atol=1e-6)
    assert report.student_own  # the dense FFNs of the Switch layers keep the student's init
    assert _parse([], [f"MODEL_DIR = '{tmp_path}/other'"]).distill is None


def test_distill_gin_needs_a_teacher(tmp_path):
    with pytest.raises(ConfigError, match="TEACHER_MODEL_DIR"):
        _parse(["runs/distill.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    configs = _parse(
        ["runs/distill.gin"], [f"MODEL_DIR = '{tmp_path}/s'", f"TEACHER_MODEL_DIR = '{tmp_path}'"]
    )
    with pytest.raises(ConfigError, match="no config.gin"):
        trainer.train(configs)
