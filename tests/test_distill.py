"""Distillation: the mixed loss against NumPy, the student initialisation, the distil step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from model_fixtures import make_model, random_batch, tiny_config

from switch_jax.config.settings import OptimizerConfig
from switch_jax.models.config import ConfigError
from switch_jax.parallel import partitioning
from switch_jax.training import distill, steps

B, L, V = 3, 5, 11


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_mixed(student, teacher, targets, weights, soft_weight, temperature):
    """Mean over real target tokens of w T^2 CE(p_teacher/T, student/T) + (1-w) CE(label)."""
    hard = -np.take_along_axis(_np_log_softmax(student), targets[..., None], -1)[..., 0]
    p_teacher = np.exp(_np_log_softmax(teacher / temperature))
    soft = -(p_teacher * _np_log_softmax(student / temperature)).sum(-1)
    n = weights.sum()
    return (
        ((soft_weight * temperature**2 * soft + (1 - soft_weight) * hard) * weights).sum() / n,
        (hard * weights).sum() / n,
        (soft * weights).sum() / n,
    )


@pytest.mark.parametrize("soft_weight,temperature", [(0.25, 1.0), (0.6, 2.0), (0.0, 1.0)])
def test_mixed_loss_matches_numpy(soft_weight, temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(B, L, V)) * 3
    teacher = rng.normal(size=(B, L, V)) * 3
    targets = rng.integers(1, V, (B, L)).astype(np.int32)
    weights = np.ones((B, L), np.float32)
    weights[0, -2:] = 0  # padding must not count
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": weights}
    sums = distill.distill_token_sums(
        student.astype(np.float32),
        teacher.astype(np.float32),
        batch,
        soft_weight=soft_weight,
        temperature=temperature,
    )
    n = float(sums.num_tokens)
    mixed, hard, soft = _np_mixed(student, teacher, targets, weights, soft_weight, temperature)
    assert n == weights.sum()
    assert float(sums.minimised) == float(sums.reported["objective"])
    assert float(sums.reported["objective"]) / n == pytest.approx(mixed, rel=1e-5)
    assert float(sums.reported["cross_entropy"]) / n == pytest.approx(hard, rel=1e-5)
    assert float(sums.reported["soft_cross_entropy"]) / n == pytest.approx(soft, rel=1e-5)


def test_soft_term_has_no_gradient_into_the_teacher():
    rng = np.random.default_rng(1)
    student, teacher = (rng.normal(size=(1, 2, V)).astype(np.float32) for _ in range(2))
    batch = {"decoder_target_tokens": np.ones((1, 2), np.int32)}

    def objective(t):
        return distill.distill_token_sums(student, t, batch, soft_weight=0.5).minimised

    assert not np.any(np.asarray(jax.grad(objective)(teacher)))


def _names(report_names):
    return {"/".join(map(str, n)) for n in report_names}


# Every weight of the 2+2-layer tiny model (layer 1 of each stack is a Switch layer), by
# canonical name: the student gets all of these from the teacher ...
SHARED = {
    "token_embedder/embedding",
    *(f"{s}/relpos_bias/rel_embedding" for s in ("encoder", "decoder")),
    *(f"{s}/final_norm/scale" for s in ("encoder", "decoder")),
    *(
        f"{s}/layer/{i}/{m}"
        for s in ("encoder", "decoder")
        for i in (0, 1)
        for m in (
            "pre_self_attention_norm/scale",
            "pre_mlp_norm/scale",
            *(f"self_attention/{w}" for w in ("query", "key", "value", "out")),
        )
    ),
    *(
        f"decoder/layer/{i}/{m}"
        for i in (0, 1)
        for m in ("pre_cross_attention_norm/scale",)
        + tuple(f"cross_attention/{w}" for w in ("query", "key", "value", "out"))
    ),
    *(f"{s}/layer/0/mlp/{w}" for s in ("encoder", "decoder") for w in ("wi", "wo")),
}
# ... except these, the Switch layers' router and experts (teacher) and dense FFN (student).
TEACHER_ONLY = {
    f"{s}/layer/1/mlp/{w}" for s in ("encoder", "decoder") for w in ("router", "wi", "wo")
}
STUDENT_OWN = {f"{s}/layer/1/mlp/{w}" for s in ("encoder", "decoder") for w in ("wi", "wo")}


@pytest.mark.parametrize("teacher_scan,student_scan", [(False, False), (True, False), (True, True)])
def test_student_init_copies_exactly_the_non_expert_weights(teacher_scan, student_scan):
    teacher_cfg = tiny_config(scan_layers=teacher_scan)
    student_cfg = distill.dense_twin(tiny_config(scan_layers=student_scan))
    teacher = nnx.state(make_model(teacher_cfg, seed=1), nnx.Param)
    student = nnx.state(make_model(student_cfg, seed=2), nnx.Param)
    new, report = distill.init_from_teacher(student, teacher, student_cfg, teacher_cfg)

    assert _names(report.copied) == SHARED
    assert _names(report.teacher_unused) == TEACHER_ONLY
    assert _names(report.student_own) == STUDENT_OWN
    t = distill.per_layer(teacher, teacher_cfg)
    s_old = distill.per_layer(student, student_cfg)
    s_new = distill.per_layer(new, student_cfg)
    assert _names(s_new) == SHARED | STUDENT_OWN
    for name, value in s_new.items():
        key = "/".join(map(str, name))
        if key in SHARED:
            np.testing.assert_array_equal(value, t[name], err_msg=key)
            assert not np.array_equal(value, s_old[name]), key  # it really changed
        else:
            assert key in STUDENT_OWN
            np.testing.assert_array_equal(value, s_old[name], err_msg=key)
    # The tree keeps the student's structure, shapes and Param metadata.
    flat_old, flat_new = nnx.to_flat_state(student), nnx.to_flat_state(new)
    for (p_old, v_old), (p_new, v_new) in zip(flat_old, flat_new, strict=True):
        assert p_old == p_new and v_old.shape == v_new.shape
        assert v_old.get_metadata() == v_new.get_metadata()


def test_student_must_be_the_dense_twin():
    teacher_cfg = tiny_config()
    teacher = nnx.state(make_model(teacher_cfg), nnx.Param)
    wider = distill.dense_twin(tiny_config(d_model=24))
    student = nnx.state(make_model(wider), nnx.Param)
    with pytest.raises(ConfigError, match="dense twin"):
        distill.init_from_teacher(student, teacher, wider, teacher_cfg)


def test_distill_config_checks():
    with pytest.raises(ConfigError, match="DISTILL_SOFT_WEIGHT"):
        distill.DistillConfig(soft_weight=1.5)


def test_distill_train_step_minimises_the_mixed_objective():
    """The student step's loss is the NumPy mixed objective of the two models' own logits."""
    part = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
    opt = OptimizerConfig(min_dim_size_to_factor=8)
    teacher_cfg = tiny_config(dtype="float32", z_loss=0.0)
    student_cfg = distill.dense_twin(teacher_cfg)
    teacher_model = make_model(teacher_cfg, seed=1)
    t_params = nnx.state(teacher_model, nnx.Param)
    teacher = steps.abstract_params(teacher_cfg, part)
    objective = distill.distill_objective(teacher_cfg, teacher, soft_weight=0.25)
    abstract = steps.abstract_train_state(student_cfg, opt, part)
    step = steps.make_train_step(student_cfg, opt, part, abstract=abstract, objective=objective)
    state = steps.init_train_state(student_cfg, opt, part, seed=3, abstract=abstract)
    batch = random_batch(teacher_cfg, batch=2, length=8)
    batch["decoder_loss_weights"] = np.ones((2, 8), np.float32)
    batch["decoder_loss_weights"][1, -3:] = 0
    s_model = nnx.merge(abstract.graphdef, jax.device_get(state.params))

    def logits(model):
        graphdef, params = nnx.split(model)
        return np.asarray(jax.jit(lambda p, b: nnx.merge(graphdef, p)(b)[0])(params, batch))

    expected, hard, _ = _np_mixed(
        logits(s_model).astype(np.float64),
        logits(teacher_model).astype(np.float64),
        batch["decoder_target_tokens"],
        batch["decoder_loss_weights"],
        0.25,
        1.0,
    )
    _, metrics = step(state, part.shard_batch(batch), t_params)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["cross_entropy"]) == pytest.approx(hard, rel=1e-5)
