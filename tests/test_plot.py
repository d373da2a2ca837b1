"""switch_jax.plot: PNGs from metrics.jsonl rows in the trainer's own key format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from switch_jax.report import metrics, plots

pytest.importorskip("matplotlib")
E = 4


def _rows(steps):
    """Rows as the trainer writes them: steps.py-style metrics through metrics.flatten_metrics."""
    rng = np.random.default_rng(0)
    rows = []
    for step in steps:
        fractions = rng.dirichlet(np.ones(E), size=2)  # [S=2 sparse layers, E]
        host = {
            "loss": 10.0 / step,
            "cross_entropy": 9.0 / step,
            "learning_rate": 0.01,
            "encoder/expert_fraction": fractions,
            "encoder/fraction_dropped": np.array([0.1, 0.2]) / step,
            "encoder/router_confidence": np.array([0.3, 0.4]),
            "encoder/aux_loss": np.array([1.1, 1.2]),
        }
        scalars, lists = metrics.flatten_metrics(host, {"encoder": [1, 3]})
        rows.append({"step": step, **scalars, **lists, "tokens_per_s": 100.0 * step})
    return rows


def _write(path, rows, extra_line=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(extra_line)


def test_expert_load_matrix_is_the_logged_fractions_times_experts():
    rows = _rows([1, 2, 3])
    assert plots.moe_layers(rows) == ["encoder/layer_1", "encoder/layer_3"]
    steps, load_ES = plots.load_matrix(rows, "encoder/layer_3")
    assert steps.tolist() == [1, 2, 3]
    expected = np.array([r["moe/encoder/layer_3/expert_fraction"] for r in rows]).T * E
    np.testing.assert_allclose(load_ES, expected)
    np.testing.assert_allclose(load_ES.sum(axis=0), E, rtol=1e-5)  # shares sum to 1


def test_plot_run_writes_every_png(tmp_path):
    rows = _rows(range(1, 21))
    # A resumed run may repeat a step (the later row wins) and a crash may cut the last line.
    _write(str(tmp_path / "train" / "metrics.jsonl"), rows + [rows[-1]], '{"step": 21, "lo')
    _write(str(tmp_path / "eval" / "metrics.jsonl"), [rows[9], rows[19]])
    paths = plots.plot_run(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    expected = ["expert_load.png", "learning_rate.png", "loss.png", "moe_health.png"]
    assert names == sorted(expected + ["throughput.png"])
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    assert [r["step"] for r in plots.read_rows(str(tmp_path / "train" / "metrics.jsonl"))] == list(
        range(1, 21)
    )


def test_cli_on_an_empty_model_dir_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "switch_jax.plot", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"PlotError: MODEL_DIR={tmp_path} has no train/ or eval/ metrics.jsonl to plot"
    )
