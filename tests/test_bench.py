"""Smoke test of `python -m switch_jax.bench`: every figure present, finite and positive; the
count of distinct kernels it reports beside compile times."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp

from switch_jax.config import gin_config
from switch_jax.tools.benchmarks import kernels, suite

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
        assert 0 < figures["kernels"]["distinct"] <= figures["kernels"]["fusions"]
    assert result["step"]["model"] == "switch" and result["dense"]["model"] == "dense"
    assert _positive(result["switch_over_dense_step_time"]["paired_median"])
    sorted_step = result["dispatches"]["sorted"]
    assert sorted_step["switch"]["dispatch"] == "sorted"
    assert sorted_step["dense"]["model"] == "dense"
    # The tests' persistent cache is on: the dense twin compiled a second time is a load, and
    # the table says so rather than passing it off as a compile.
    assert sorted_step["dense"]["compile_from_cache"] is True
    assert "(dense " in suite.format_table(result)
    assert "from the compile cache" in suite.format_table(result).split("dispatch   sorted")[1]
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


# ----------------------------------------------------------------------------- kernel count

_HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%max (c: f32[], d: f32[]) -> f32[] {
  %c = f32[] parameter(0)
  %d = f32[] parameter(1)
  ROOT %m = f32[] maximum(%c, %d)
}

%fused_a (p0: f32[4], p1: f32[4]) -> f32[] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %z = f32[] constant(0)
  %d1 = f32[4]{0} subtract(%p0, %p1), metadata={op_name="jit(f)/sub" stack_frame_id=1}
  ROOT %r = f32[] reduce(%d1, %z), dimensions={0}, to_apply=%add
}

%fused_a_again (q0: f32[4], q1: f32[4]) -> f32[] {
  %q0 = f32[4]{0} parameter(0)
  %q1 = f32[4]{0} parameter(1)
  %zz = f32[] constant(0)
  %dd = f32[4]{0} subtract(%q0, %q1), metadata={op_name="jit(f)/other" stack_frame_id=9}
  ROOT %rr = f32[] reduce(%dd, %zz), dimensions={0}, to_apply=%add
}

%fused_max (p0: f32[4], p1: f32[4]) -> f32[] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %z = f32[] constant(0)
  %d1 = f32[4]{0} subtract(%p0, %p1)
  ROOT %r = f32[] reduce(%d1, %z), dimensions={0}, to_apply=%max
}

%fused_swapped (p0: f32[4], p1: f32[4]) -> f32[] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %z = f32[] constant(0)
  %d1 = f32[4]{0} subtract(%p1, %p0)
  ROOT %r = f32[] reduce(%d1, %z), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[4]) -> f32[] {
  %x = f32[4]{0} parameter(0)
  %f1 = f32[] fusion(%x, %x), kind=kLoop, calls=%fused_a
  %f2 = f32[] fusion(%x, %x), kind=kLoop, calls=%fused_a_again, metadata={op_name="g"}
  %f3 = f32[] fusion(%x, %x), kind=kInput, calls=%fused_a
  %f4 = f32[] fusion(%x, %x), kind=kLoop, calls=%fused_max
  %f5 = f32[] fusion(%x, %x), kind=kLoop, calls=%fused_swapped
  ROOT %t = f32[] add(%f1, %f5)
}
"""


def test_kernel_count_tells_fusions_apart_by_what_they_compute():
    # f1 and f2 differ only in names and metadata; f3 in its kind, f4 in its reducer, f5 in
    # which operand it subtracts from which.
    assert kernels.count_kernels(_HLO) == kernels.KernelCount(fusions=5, distinct=4)


def _layers(widths):
    def f(ws, x):
        for w1, w2 in ws:
            x = x + jnp.tanh(x @ w1) @ w2
        return jnp.sum(x * x)

    ws = [(jnp.ones((8, w)), jnp.ones((w, 8))) for w in widths]
    compiled = jax.jit(jax.grad(f)).lower(ws, jnp.ones((4, 8))).compile()
    return kernels.of_compiled(compiled)


def test_repeated_layers_add_fusions_but_no_distinct_kernels():
    same4, same8 = _layers([16] * 4), _layers([16] * 8)
    assert same8.fusions > same4.fusions
    assert same8.distinct == same4.distinct
    wide4, wide8 = _layers([16, 24, 32, 40]), _layers([16, 24, 32, 40, 48, 56, 64, 72])
    assert wide8.distinct > wide4.distinct > same4.distinct
