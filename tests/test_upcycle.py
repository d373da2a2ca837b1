"""Sparse upcycling: a Switch run started from a dense run's checkpoint (INIT_RESTORE='upcycle')."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

from switch_jax.config import gin_config
from switch_jax.store import checkpoints
from switch_jax.store.checkpoints import CheckpointError
from switch_jax.training import build, trainer, upcycle
from tests import model_fixtures

pytest.importorskip("seqio")

# float32 activations: the identity below sums E gated copies, which bfloat16 would round.
BINDINGS = [
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
    "MESH_SHAPE = (2, 2, 2)",
    "EVAL_PERIOD = 1000",
    "EVAL_STEPS = 0",
    "LOG_PERIOD = 1",
    "ModelConfig.dtype = 'float32'",
    "DROPOUT_RATE = 0.0",
]
# Every expert chosen and nothing dropped: the gates sum to 1 over identical experts.
ALL_EXPERTS = ["MoeConfig.top_k = 8", "MoeConfig.dispatch = 'dropless'"]


def _configs(model_dir, *extra):
    gin_config.parse_gin(["runs/demo.gin"], [*BINDINGS, f"MODEL_DIR = '{model_dir}'", *extra], [])
    return gin_config.load_configs()


def _train(model_dir, *extra):
    trainer.train(_configs(model_dir, *extra), operative_config=gin_config.operative_config())


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("dense"))
    _train(model_dir, "TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2", "ModelConfig.moe = None")
    return model_dir


def _logits(run, params, batch):
    model = nnx.merge(run.setup.model.graphdef, params)
    logits, _ = model_fixtures.forward(model, batch)
    return np.asarray(logits)


def test_upcycled_model_computes_the_dense_model_when_every_expert_is_chosen(dense_dir, tmp_path):
    dense_run = build.build_run(_configs(tmp_path / "d", "ModelConfig.moe = None"))
    dense_params = checkpoints.restore_params(dense_dir, dense_run.abstract_params)
    switch_run = build.build_run(_configs(tmp_path / "s", *ALL_EXPERTS))
    with switch_run.partitioner.activate():
        fresh = switch_run.setup.init_state().params
        params = upcycle.upcycled_params(dense_dir, fresh)
        # The in-memory path (reproduce_scaling's upcycle phase) makes the same parameters.
        in_memory = upcycle.upcycle(upcycle.flat_values(dense_params), fresh)
    for (path, restored), (_, made) in zip(
        nnx.to_flat_state(params), nnx.to_flat_state(in_memory), strict=True
    ):
        np.testing.assert_array_equal(restored.get_value(), made.get_value(), err_msg=str(path))
    flat = dict(nnx.to_flat_state(params))
    fresh_flat = dict(nnx.to_flat_state(fresh))
    dense_flat = dict(nnx.to_flat_state(dense_params))
    wi = ("encoder", "blocks", 1, "layers", 0, "mlp", "wi")
    for e in range(8):  # every expert a copy of the dense FFN of the same layer
        np.testing.assert_array_equal(flat[wi].get_value()[e], dense_flat[wi].get_value())
    router = ("encoder", "blocks", 1, "layers", 0, "mlp", "router")
    np.testing.assert_array_equal(flat[router].get_value(), fresh_flat[router].get_value())

    batch = model_fixtures.random_batch(switch_run.model_cfg, batch=8, length=8)
    with switch_run.partitioner.activate():
        upcycled = _logits(switch_run, params, batch)
    with dense_run.partitioner.activate():
        dense = _logits(dense_run, dense_params, batch)
    np.testing.assert_allclose(upcycled, dense, rtol=1e-5, atol=1e-5)


def test_compensated_top1_model_computes_the_dense_model_while_the_router_is_uniform(
    dense_dir, tmp_path
):
    dense_run = build.build_run(_configs(tmp_path / "d", "ModelConfig.moe = None"))
    dense_params = checkpoints.restore_params(dense_dir, dense_run.abstract_params)
    # Top-1 (the default), nothing dropped; a zero router gives every expert p = 1/E.
    switch_run = build.build_run(_configs(tmp_path / "s", "MoeConfig.dispatch = 'dropless'"))
    with switch_run.partitioner.activate():
        fresh = switch_run.setup.init_state().params
        zeroed = nnx.from_flat_state(
            [
                (path, var.replace(value=var.get_value() * 0) if path[-1] == "router" else var)
                for path, var in nnx.to_flat_state(fresh)
            ]
        )
        kept = upcycle.upcycle(upcycle.flat_values(dense_params), zeroed, gate="keep")
        compensated = upcycle.upcycle(upcycle.flat_values(dense_params), zeroed, "compensate")
    flat, kept_flat = dict(nnx.to_flat_state(compensated)), dict(nnx.to_flat_state(kept))
    mlp = ("encoder", "blocks", 1, "layers", 0, "mlp")
    np.testing.assert_array_equal(  # only the copies' output kernel is scaled, by E = 8
        flat[mlp + ("wo",)].get_value(), 8 * kept_flat[mlp + ("wo",)].get_value()
    )
    np.testing.assert_array_equal(
        flat[mlp + ("wi",)].get_value(), kept_flat[mlp + ("wi",)].get_value()
    )

    batch = model_fixtures.random_batch(switch_run.model_cfg, batch=8, length=8)
    with switch_run.partitioner.activate():
        got = {
            gate: _logits(switch_run, p, batch)
            for gate, p in (("keep", kept), ("compensate", compensated))
        }
    with dense_run.partitioner.activate():
        dense = _logits(dense_run, dense_params, batch)
    np.testing.assert_allclose(got["compensate"], dense, rtol=1e-5, atol=1e-5)
    assert np.abs(got["keep"] - dense).max() > 1e-2  # the plain copies start elsewhere (p = 1/8)
    with pytest.raises(ValueError, match="gate 'half' must be one of keep, compensate"):
        upcycle.upcycle(upcycle.flat_values(dense_params), zeroed, "half")


def test_upcycle_run_starts_from_the_dense_checkpoint(dense_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "upcycled")
    _train(model_dir, f"INIT_CHECKPOINT = '{dense_dir}'", "INIT_RESTORE = 'upcycle'",
           "TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2", "UPCYCLE_GATE = 'compensate'")  # fmt: skip
    assert "routers fresh, gate compensate" in capsys.readouterr().out
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_plan_names_what_does_not_correspond():
    switch = {
        "enc/mlp/wi": ((4, 16, 32), ("expert", "embed", "mlp")),
        "enc/mlp/router": ((16, 4), ("embed", "unmodeled")),
        "enc/norm": ((16,), ("embed",)),
    }
    assert upcycle.plan({"enc/mlp/wi": (16, 32), "enc/norm": (16,)}, switch) == {
        "enc/mlp/wi": ("expand", 0),
        "enc/mlp/router": "fresh",
        "enc/norm": "copy",
    }
    with pytest.raises(CheckpointError, match=r"enc/mlp/wi: dense \(16, 64\) vs switch") as e:
        upcycle.plan({"enc/mlp/wi": (16, 64), "enc/norm": (16,)}, switch)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="missing enc/norm.*unused enc/extra"):
        upcycle.plan({"enc/mlp/wi": (16, 32), "enc/extra": (3,)}, switch)


def test_a_fine_tune_says_which_checkpoint_it_started_from(dense_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "tuned")
    _train(model_dir, f"INIT_CHECKPOINT = '{dense_dir}'", "ModelConfig.moe = None",
           "TRAIN_STEPS = 1", "CHECKPOINT_PERIOD = 1")  # fmt: skip
    out = capsys.readouterr().out
    assert f"initialised from {dense_dir} step 2 (params; fresh optimizer, step 0)" in out


def test_a_bad_upcycle_gate_is_one_line():
    from switch_jax.config.settings import CheckpointConfig  # noqa: PLC0415
    from switch_jax.models.config import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="UPCYCLE_GATE='half' must be one of keep, compensate"):
        CheckpointConfig(upcycle_gate="half")
