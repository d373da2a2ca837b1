"""Smoke test of `python -m switch_jax.bench`: every figure present, finite and positive."""

from __future__ import annotations

import json
import math

from switch_jax.config import gin_config
from switch_jax.tools.benchmarks import suite

BINDINGS = [
    "BATCH_SIZE=8",
    "TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
    "ModelConfig.d_model=32",
    "ModelConfig.d_ff=64",
    "ModelConfig.num_encoder_layers=1",
    "ModelConfig.num_decoder_layers=1",
    "MoeConfig.sparse_every=1",
    "MoeConfig.num_experts=2",
]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_json_has_finite_positive_figures(tmp_path):
    gin_config.parse_gin(["models/tiny.gin"], BINDINGS)
    dispatch = dict(group_sizes=[32], experts=[2], total_tokens=64, repeats=1)
    result = suite.run_benchmarks(
        gin_config.load_configs(),
        ["step", "dense", "dispatches", "dispatch", "checkpoint"],
        steps=2,
        warmup=1,
        dispatch=dispatch,
        dispatches=["sorted"],
    )
    result = json.loads(json.dumps(result))  # what --json prints
    assert _positive(result["peak_flops"])
    for name in ("step", "dense"):
        figures = result[name]
        for key in ("compile_s", "step_s", "tokens_per_s", "mfu", "process_max_rss_bytes"):
            assert _positive(figures[key]), (name, key, figures[key])
        assert math.isfinite(figures["loss"])
    assert result["step"]["model"] == "switch" and result["dense"]["model"] == "dense"
    assert _positive(result["switch_over_dense_step_time"]["paired_median"])
    sorted_step = result["dispatches"]["sorted"]
    assert sorted_step["switch"]["dispatch"] == "sorted"
    assert sorted_step["dense"]["model"] == "dense"
    assert _positive(sorted_step["over_dense_cpu"]["paired_median"])
    rows = result["dispatch"]["rows"]
    assert {(r["dispatch"], r["group_size"]) for r in rows} == {
        (d, 32) for d in ("einsum", "scatter", "sorted", "dropless")
    }
    assert all(_positive(r["over_dense_ffn"]) for r in rows)
    assert all(_positive(r["ns_per_token"]) for r in rows)
    ckpt = result["checkpoint"]
    assert _positive(ckpt["save_call"]["median_s"]) and _positive(ckpt["step_s_after_save"])
    assert "switch / dense" in suite.format_table(result)


def test_dispatch_names_carry_the_grouped_matmul():
    from switch_jax.models.config import MoeConfig  # noqa: PLC0415
    from switch_jax.tools.benchmarks.dispatch import moe_variant  # noqa: PLC0415

    base = MoeConfig(grouped_matmul="blocked")
    fused = moe_variant(base, "sorted:fused")
    assert (fused.dispatch, fused.grouped_matmul) == ("sorted", "fused")
    plain = moe_variant(base, "scatter")
    assert (plain.dispatch, plain.grouped_matmul) == ("scatter", "blocked")
