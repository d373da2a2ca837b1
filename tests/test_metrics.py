"""metrics: JSON lines, TensorBoard events, MFU arithmetic, MoE flattening, resume truncation."""

import glob
import json
import os

import numpy as np
import pytest

from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.models.routing import RouterStats
from switch_jax.report import hardware, metrics

E = 4


def router_stats(layers: int) -> RouterStats:
    return RouterStats(
        aux_loss=np.full(layers, 1.02, np.float32),
        router_z_loss=np.full(layers, 3.5, np.float32),
        expert_fraction=np.tile(np.array([0.4, 0.3, 0.2, 0.1], np.float32), (layers, 1)),
        fraction_dropped=np.linspace(0.0, 0.1, layers).astype(np.float32),
        router_confidence=np.full(layers, 0.6, np.float32),
        effective_capacity_factor=np.full(layers, 1.25, np.float32),
    )


def step_metrics(loss: float) -> dict:
    return {
        "loss": np.float32(loss),
        "cross_entropy": np.float32(loss - 0.01),
        "aux_loss": np.float32(0.0102),
        "z_loss": np.float32(1e-4),
        "router_z_loss": np.float32(0.0),
        "accuracy": np.float32(0.25),
        "learning_rate": np.float32(0.01),
        "grad_norm": np.float32(1.5),
        "moe": {"encoder": router_stats(2), "decoder": router_stats(2)},
    }


def test_mfu_by_hand():
    # A step of 3 x 2e12 forward FLOPs taking 0.5 s on 4 chips of 275 TFLOP/s (TPU v4):
    # 6e12 / 0.5 / 1.1e15 = 1.0909 %.
    peak = 4 * hardware.peak_flops_per_device("TPU v4")
    assert metrics.mfu(3 * 2e12, 0.5, peak) == pytest.approx(6e12 / 0.5 / 1.1e15)
    info = type("Info", (), {"flops_per_sequence": 1e9})()
    assert metrics.train_flops_per_step(info, batch_size=8) == 24e9


def test_flatten_moe_names_layers():
    cfg = ModelConfig(num_encoder_layers=4, num_decoder_layers=4, moe=MoeConfig(num_experts=E))
    layers = metrics.moe_layer_ids(cfg)
    assert layers == {"encoder": [1, 3], "decoder": [1, 3]}
    scalars, lists = metrics.flatten_metrics(step_metrics(2.0), layers)
    assert scalars["moe/encoder/layer_3/fraction_dropped"] == pytest.approx(0.1)
    assert scalars["moe/decoder/layer_1/router_confidence"] == pytest.approx(0.6)
    assert scalars["moe/encoder/layer_1/expert_usage_max"] == pytest.approx(0.4 * E)
    assert scalars["moe/encoder/layer_1/expert_usage_min"] == pytest.approx(0.1 * E)
    assert scalars["moe/fraction_dropped"] == pytest.approx(0.05)  # mean over the 4 layers
    assert lists["moe/decoder/layer_3/expert_fraction"] == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_logger_writes_jsonl_tensorboard_and_progress(tmp_path, capsys):
    logger = metrics.MetricsLogger(
        str(tmp_path), total_steps=30, flops_per_step=3e9, peak=1e11, moe_layers=None
    )
    for step in (10, 20, 30):
        logger.log_train(step, step_metrics(3.0 - step / 100), step_time=0.1, tokens=4096)
    logger.log_eval(30, {"loss": np.float32(2.5), "accuracy": np.float32(0.3)})
    logger.close()

    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [10, 20, 30]
    expected = {
        "step", "loss", "cross_entropy", "aux_loss", "z_loss", "router_z_loss", "accuracy",
        "learning_rate", "grad_norm", "step_time", "tokens_per_s", "mfu",
        "moe/encoder/layer_0/fraction_dropped", "moe/decoder/layer_1/router_confidence",
        "moe/encoder/layer_1/expert_fraction", "moe/fraction_dropped",
    }  # fmt: skip
    assert expected <= set(rows[0])
    assert rows[0]["tokens_per_s"] == pytest.approx(40960)
    assert rows[0]["mfu"] == pytest.approx(3e9 / 0.1 / 1e11)
    eval_rows = [
        json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    ]
    assert eval_rows == [{"step": 30, "loss": 2.5, "accuracy": pytest.approx(0.3)}]
    for kind in ("train", "eval"):
        assert glob.glob(os.path.join(tmp_path, kind, "events.out.tfevents.*")), kind
    out = capsys.readouterr().out
    assert "step 30/30" in out and "ETA" in out and "dropped" in out and "eval  step 30" in out


def test_resume_drops_lines_after_the_restored_step(tmp_path):
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=40, console=False)
    for step in (10, 20, 30):
        logger.log_train(step, {"loss": 1.0}, step_time=1.0, tokens=1)
    logger.close()
    with open(tmp_path / "train" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3')  # a line cut short by a crash
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=40, start_step=20, console=False)
    logger.log_train(30, {"loss": 0.5}, step_time=1.0, tokens=1)
    logger.close()
    rows = [
        json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 1.0), (20, 1.0), (30, 0.5)]


def test_non_chief_writes_nothing(tmp_path):
    logger = metrics.MetricsLogger(str(tmp_path / "run"), total_steps=10, is_chief=False)
    logger.log_train(1, {"loss": 1.0}, step_time=1.0, tokens=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_clu(tmp_path, monkeypatch):
    # GPU images have no TensorFlow, so no clu: tensorboard's own event writer takes over.
    monkeypatch.setitem(__import__("sys").modules, "clu", None)
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=1, console=False)
    logger.log_train(1, {"loss": 1.0}, step_time=1.0, tokens=1)
    logger.close()
    assert glob.glob(os.path.join(tmp_path, "train", "events.out.tfevents.*"))


def test_flat_stack_keys_as_steps_returns_them():
    stats = router_stats(2)._asdict()
    flat = {f"encoder/{k}": v for k, v in stats.items()}
    flat["encoder/effective_capacity_factor"] = np.float32(1.25)  # steps.py averages this one
    scalars, lists = metrics.flatten_metrics({"loss": 1.0, **flat}, {"encoder": [1, 3]})
    assert scalars["moe/encoder/layer_3/fraction_dropped"] == pytest.approx(0.1)
    assert scalars["moe/encoder/effective_capacity_factor"] == pytest.approx(1.25)
    assert "moe/encoder/layer_1/expert_fraction" in lists and scalars["loss"] == 1.0
    assert not any(k.startswith("encoder/") for k in [*scalars, *lists])
