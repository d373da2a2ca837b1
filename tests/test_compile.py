"""The tiny config compiled ahead of time for a TPU topology (needs libtpu; ~1 min on 2 cores).

One compile (module fixture) is checked against the planner (`info`), against hand-derived
all-to-all sizes, and against the compiler's own argument bytes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from switch_jax.config import gin_config
from switch_jax.tools import aot, planner

pytest.importorskip("libtpu", reason=f"compiling for TPU needs libtpu: {aot.INSTALL_HINT}")

TOPOLOGY, MESH, BATCH, LENGTHS = "v5e-4", (1, 4, 1), 8, (64, 16)


def tiny(*bindings):
    lengths = f"{{'inputs': {LENGTHS[0]}, 'targets': {LENGTHS[1]}}}"
    defaults = [f"MESH_SHAPE={MESH}", f"BATCH_SIZE={BATCH}", f"TASK_FEATURE_LENGTHS={lengths}"]
    gin_config.parse_gin(["models/tiny.gin"], [*defaults, *bindings])
    return gin_config.load_configs()


PROGRESS: list[str] = []  # what report logs while the fixture compiles


@pytest.fixture(scope="module")
def compiled() -> dict:
    return aot.report(tiny(), TOPOLOGY, log=PROGRESS.append)


def test_info_and_compile_agree_on_state_bytes_per_chip(compiled):
    planned = planner.report(tiny(), num_devices=4)
    want = {
        "params": planned["param_bytes_per_device"],
        "optimizer": planned["optimizer_bytes_per_device"],
        "other": planned["other_bytes_per_device"],
    }
    # compiled_state: the shardings XLA chose for the executable's inputs, on the TPU devices
    assert compiled["compiled_state_per_chip"] == want == compiled["planned_state_per_chip"]
    assert compiled["mesh_shape"] == list(MESH) and compiled["chips"] == 4


def test_compiler_argument_bytes_are_the_state_and_batch(compiled):
    s = compiled["planned_state_per_chip"]
    batch = BATCH // 4 * (3 * LENGTHS[0] + 5 * LENGTHS[1]) * 4  # int32 features per chip
    arguments = compiled["memory_per_chip"]["arguments"]
    # TPU tiling pads small dims; jit drops Adafactor's unused [.., 1] placeholders: within 1%.
    assert arguments == pytest.approx(sum(s.values()) + batch, rel=0.01)
    m = compiled["memory_per_chip"]
    assert m["aliased"] >= 0.99 * (s["params"] + s["optimizer"])  # the donated state
    assert 0 < m["total"] < compiled["hbm_bytes_per_chip"] and compiled["hbm_fraction"] < 0.01


def test_all_to_all_volume_is_hand_computable(compiled):
    # tiny: 8 experts, capacity factor 1.25, group size 512, num_expert_partitions 4. Encoder:
    # 8 x 64 tokens in 4 groups of 128, capacity 1.25 * 128 / 8 = 20; decoder 8 x 16 in 4 groups
    # of 32, capacity 5. One sparse layer per stack, a dispatch and a combine all-to-all each,
    # forward and backward: 8 all-to-alls of [1 group, 8 experts, C, 128] bfloat16 per chip.
    c = compiled["collectives_per_chip"]
    assert c["all-to-all"]["count"] == 8
    assert c["all-to-all"]["bytes"] == 2 * 2 * (1 * 8 * (20 + 5) * 128 * 2)
    assert c["all-gather"]["count"] == 0  # expert parallelism moves tokens, not weights
    assert c["all-reduce"]["count"] > 0  # gradients of the replicated dense weights


def test_cost_analysis_is_the_model_flops(compiled):
    # The compiler's per-chip FLOPs x chips against 3 x forward FLOPs (models.info, no
    # rematerialisation): the same work up to elementwise ops and the dispatch einsums.
    total = compiled["flops_per_chip"] * compiled["chips"]
    assert 0.8 < total / compiled["model_train_flops_per_step"] < 1.6
    assert compiled["step_s_at_peak"] == pytest.approx(compiled["flops_per_chip"] / 197e12)


def test_text_report(compiled):
    text = aot.format_report(compiled)
    assert "train step for v5e-4 (4 chips, TPU v5 lite)" in text
    assert "data 1 x expert 4 x model 1" in text and "(planner: the same)" in text
    assert "all-to-all 8 x" in text and "loop bodies counted once" not in text
    assert compiled["loop_trips"] == [] or max(compiled["loop_trips"]) == 1  # unrolled layers


def test_progress_lines_come_before_and_after_the_compile(compiled):
    assert PROGRESS[0].startswith("loading libtpu for v5e-4 (4 chips)")
    assert PROGRESS[1] == "compiling the train step for v5e-4 (4 chips)... minutes on a CPU host"
    assert PROGRESS[2] == f"compiled in {compiled['compile_s']:.0f} s" and len(PROGRESS) == 3


def test_roofline_of_the_compiled_step(compiled):
    # Every term again from the report's own figures and v5e's published ones: 197 TFLOP/s,
    # 819 GB/s HBM, 400 GB/s ICI both ways (200 out). Expert all-to-alls over the 4 chips of the
    # expert axis move 3/4 of their bytes; gradient all-reduces over the same 4 chips 2 x 3/4.
    e, c = compiled["roofline"], compiled["collectives_per_chip"]
    assert c["all-to-all"]["by_group"] == {"4": c["all-to-all"]["bytes"]}
    assert set(c["all-reduce"]["by_group"]) <= {"4", "all"}
    sent = 0.75 * c["all-to-all"]["bytes"] + 1.5 * c["all-reduce"]["bytes"]
    assert e["ici_bytes"] == pytest.approx(sent)
    assert e["terms_s"]["ici"] == pytest.approx(sent / 200e9)
    assert e["terms_s"]["hbm"] == pytest.approx(compiled["bytes_accessed_per_chip"] / 819e9)
    assert e["terms_s"]["compute"] == pytest.approx(compiled["step_s_at_peak"])
    assert e["terms_s"]["dcn"] == 0 and e["loop_scale"] == 1  # one slice, unrolled layers
    assert e["step_s"] == max(e["terms_s"].values()) and e["bound"] == "hbm"  # tiny: no reuse
    assert e["mfu"] == pytest.approx(
        compiled["model_train_flops_per_step"] / (e["step_s"] * 4 * 197e12)
    )
    assert "per step on v5e, hbm-bound" in aot.format_report(compiled)


def test_state_larger_than_hbm_is_refused_before_compiling():
    # 8 experts with d_ff 2^20: 19.3 GB of float32 parameters on one 15.75 GiB v5e chip.
    configs = tiny("ModelConfig.d_ff=1048576", "MESH_SHAPE=(1, 1, 1)")
    with pytest.raises(aot.DoesNotFitError) as e:
        aot.report(configs, "v5e-1")
    text = str(e.value)
    assert text.startswith("does not fit v5e-1 with MESH_SHAPE=(1, 1, 1), BATCH_SIZE=8")
    assert "more than its 15.75 GiB of HBM" in text and "PARTITION_RULES=fsdp" in text


def test_cli_says_what_does_not_fit_in_one_line():
    cmd = [sys.executable, "-m", "switch_jax.compile", "--gin_file=models/tiny.gin"]
    cmd += ["--topology=v5e-1", "--gin.ModelConfig.d_ff=1048576", "--gin.MESH_SHAPE=(1, 1, 1)"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("DoesNotFitError: does not fit v5e-1 with MESH_SHAPE=(1, 1, 1)")
    assert "GiB more than its 15.75 GiB of HBM" in last
    # The progress line came first (flushed), and libtpu's own warnings were not swallowed.
    assert "loading libtpu for v5e-1 (1 chip): without a TPU" in out.stderr
