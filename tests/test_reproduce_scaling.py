"""scripts/reproduce_scaling.py: its decoder-only LM path end to end, router tallies, paired SE."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import reproduce_scaling  # noqa: E402
import scaling_report  # noqa: E402
import scaling_trainer  # noqa: E402

STEPS, BATCH, LENGTH, LAYERS, EXPERTS = 4, 8, 32, 2, 2


@pytest.fixture(scope="module")
def lm_results(tmp_path_factory):
    pytest.importorskip("seqio")
    out = str(tmp_path_factory.mktemp("scaling_lm"))
    # main() points the compile cache at --out; give the other tests theirs back afterwards.
    cache = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    flags = [
        "--scale=smoke",
        "--architecture=decoder_only",
        f"--targets_length={LENGTH}",
        f"--experts={EXPERTS}",
        f"--layers={LAYERS}",
        f"--steps={STEPS}",
        "--eval_every=2",
        "--eval_batches=1",
        "--capacity_factor=1.0",
        "--no_plots",
        "--phases=scaling,upcycle,distill",
        f"--out={out}",
    ]
    try:
        reproduce_scaling.main(flags)
        with open(os.path.join(out, "results.json")) as f:
            first = json.load(f)
        # Resumed: everything is in results.json, so nothing trains again (timings unchanged).
        reproduce_scaling.main(flags)
        with pytest.raises(SystemExit, match="steps: 4 there, 6 now"):
            reproduce_scaling.main(flags + ["--steps=6"])
    finally:
        jax.config.update("jax_compilation_cache_dir", cache[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", cache[1])
        # The smoke scale registers the embedded tasks with its own small vocabulary; later
        # tests in this process must get the default ones (test_host_count compares with them).
        from switch_jax.data import registry  # noqa: PLC0415 (TensorFlow)

        for name in ("embedded_span_corruption", "embedded_lm"):
            registry.forget(name)
    with open(os.path.join(out, "results.json")) as f:
        resumed = json.load(f)
    assert {k: resumed[k] for k in first if k != "total_s"} == {
        k: v for k, v in first.items() if k != "total_s"
    }
    return resumed, out


@pytest.mark.slow
def test_decoder_only_lm_run(lm_results):
    results, out = lm_results
    args = results["args"]
    assert args["task"] == "embedded_lm"  # the smoke's stdlib corpus, its LM task
    # The smoke's phases include the distillation: a decoder-only teacher into its dense twin.
    assert sorted(results["distill"]["distilled"]) == ["0", "1"]
    for seed, count in args["tokens"].items():
        # An LM makes every real token a target; packing leaves little padding.
        assert count["tokens"] == count["target_tokens"], seed
        assert 0.9 * STEPS * BATCH * LENGTH <= count["target_tokens"] <= STEPS * BATCH * LENGTH
    switch = results["runs"][f"switch-{EXPERTS}"]["0"]
    load = np.asarray(switch["expert_load"])
    # One row per decoder layer (all sparse at the smoke's sparse_every=1), each summing to E.
    assert load.shape == (LAYERS, EXPERTS)
    np.testing.assert_allclose(load.sum(-1), EXPERTS, rtol=1e-5)
    assert [p["step"] for p in switch["curve"]] == [2, 4]
    assert 0.0 <= switch["run_fraction_dropped"] <= switch["run_dropped_worst_layer"] <= 1.0
    assert (
        "expert_load" in results["runs"]["dense"]["0"]
        and not results["runs"]["dense"]["0"]["expert_load"]
    )
    assert os.path.exists(os.path.join(out, "summary.md"))


@pytest.mark.slow
def test_upcycle_phase(lm_results):
    results, _ = lm_results
    runs = results["upcycle"][f"upcycled-{EXPERTS}"]
    assert sorted(runs) == ["0", "1"]
    for seed, run in runs.items():
        dense = {p["step"]: p["val_loss"] for p in results["runs"]["dense"][seed]["curve"]}
        # The dense state it starts from is the scaling phase's dense run at that step.
        assert run["upcycled_at"] == STEPS // 2
        assert run["dense_at"] == pytest.approx(dense[STEPS // 2], abs=1e-6)
        # Its curve starts at the checkpoint (before training) and counts whole-run steps.
        assert [p["step"] for p in run["curve"]] == [2, 4]
        assert run["curve"][0]["val_loss"] == run["initial_val_loss"]
        assert np.isfinite(run["curve"][-1]["val_loss"])
    compensated = results["upcycle"][f"upcycled-{EXPERTS}-compensate"]
    assert [(r["gate"], r["dense_at"]) for r in compensated.values()] == [
        ("compensate", r["dense_at"]) for r in runs.values()
    ]
    summary = scaling_report.summarise(results)["upcycle"][f"upcycled-{EXPERTS}"]
    assert summary["agree"]["max"] < 1e-6 and summary["final"]["n"] == 2


def test_model_config_options():
    args = reproduce_scaling.parse_args(
        ["--scale=pilot", "--capacity_factor=1.5", "--layers=3", "--sparse_every=2"]
    )
    cfg = reproduce_scaling.model_config(args, 8)
    assert (cfg.architecture, cfg.num_encoder_layers, cfg.num_decoder_layers) == (
        "decoder_only",
        0,
        3,
    )
    assert (cfg.moe.capacity_factor_train, cfg.moe.capacity_factor_eval) == (1.5, 2.0)
    assert [cfg.is_sparse(i) for i in range(3)] == [False, True, False]
    assert args.phases == ["scaling"]
    assert reproduce_scaling.parse_args(["--scale=cpu"]).phases == ["scaling", "distill"]
    lm = reproduce_scaling.parse_args(["--scale=lm"])
    assert lm.phases == ["scaling", "upcycle", "distill"]
    assert (lm.upcycle_experts, lm.upcycle_at) == (8, 800)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--architecture=decoder"], "--architecture must be one of"),
        (["--capacity_factor=0"], "--capacity_factor=0.0 must be > 0"),
        (["--scale=pilot", "--architecture=encoder_decoder"], "--inputs_length must be >= 1"),
        (["--upcycle_at=25"], "--upcycle_at must be a multiple of --eval_every"),
    ],
)
def test_bad_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        reproduce_scaling.parse_args(flags)
    assert message in capsys.readouterr().err


def test_router_tally_against_numpy():
    rng = np.random.default_rng(0)
    steps = [
        {
            "decoder/fraction_dropped": rng.uniform(0, 0.3, 2),
            "decoder/expert_fraction": rng.dirichlet(np.ones(4), 2),
            "loss": 1.0,
        }
        for _ in range(5)
    ]
    tally = scaling_trainer.RouterTally()
    for m in steps:
        tally.add({k: v for k, v in m.items() if k != "loss"})
    dropped = np.mean([m["decoder/fraction_dropped"] for m in steps], 0)
    load = 4 * np.mean([m["decoder/expert_fraction"] for m in steps], 0)
    got = tally.summary()
    np.testing.assert_allclose(tally.loads(), load)
    np.testing.assert_allclose(
        [got["fraction_dropped"], got["dropped_worst_layer"], got["load_max"], got["load_min"]],
        [dropped.mean(), dropped.max(), load.max(), load.min()],
    )
    empty = scaling_trainer.RouterTally()
    empty.add({})  # a dense model reports no router metrics
    assert empty.summary()["fraction_dropped"] == 0.0 and "load_max" not in empty.summary()


def _run(final: float, step_ms: float = 10.0) -> dict:
    curve = [{"step": 10, "train_s": 1.0, "val_loss": final + 1.0, "fraction_dropped": 0.1}]
    curve.append({"step": 20, "train_s": 2.0, "val_loss": final})
    return {"curve": curve, "step_ms": step_ms, "run_fraction_dropped": 0.05}


def test_upcycle_summary_against_hand_values():
    dense = {str(s): _run(v) for s, v in enumerate([5.0, 5.2])}
    for run in dense.values():
        run["curve"].insert(0, {"step": 0, "train_s": 0.0, "val_loss": 9.0})
    upcycled = {}
    for seed, final in enumerate([4.8, 5.1]):
        run = _run(final)
        run["curve"][0].update(step=10, val_loss=6.5)
        run.update(upcycled_at=10, dense_at=dense[str(seed)]["curve"][1]["val_loss"])
        upcycled[str(seed)] = {**run, "initial_val_loss": 6.5}
    results = {
        "args": {"steps": 20, "tokens": {}},
        "runs": {"dense": dense, "switch-8": {str(s): _run(v) for s, v in enumerate([4.9, 5.0])}},
        "upcycle": {"upcycled-8": upcycled},
    }
    row = scaling_report.summarise(results)["upcycle"]["upcycled-8"]
    assert row["gain"]["mean"] == pytest.approx((0.2 + 0.1) / 2)
    assert row["vs_scratch"]["mean"] == pytest.approx((0.1 - 0.1) / 2)
    assert row["agree"]["max"] == 0.0
    # Dense needs 10 steps past step 10 for its final loss; the upcycled run of seed 0 reaches
    # 5.0 at 10 + 10 * 1.5/1.7 (interpolated between 6.5 at step 10 and 4.8 at 20).
    # Seed 1: 5.2 reached at 10 + 10 * 1.3/1.4.
    assert row["speedup"]["mean"] == pytest.approx((1.7 / 1.5 + 1.4 / 1.3) / 2)
    assert (
        "| 2 seeds | 6.1000 ± 0.1414 | 6.5000 ± 0.0000 | 4.9500 ± 0.2121 | +0.1500 ± 0.0500 "
        "| +3.0 |" in scaling_report.markdown(scaling_report.summarise(results), results)
    )


def test_paired_gain_standard_error():
    dense = [5.0, 5.2, 4.9]
    switch = [4.9, 5.15, 4.7]
    results = {
        "args": {"steps": 20, "tokens": {"0": {"target_tokens": 1000, "tokens": 1000}}},
        "runs": {
            "dense": {str(s): _run(v) for s, v in enumerate(dense)},
            "switch-8": {str(s): _run(v) for s, v in enumerate(switch)},
        },
    }
    summary = scaling_report.summarise(results)
    gain = summary["models"]["switch-8"]["gain_over_dense"]
    diff = np.subtract(dense, switch)  # 0.1, 0.05, 0.2
    assert gain["mean"] == pytest.approx(0.35 / 3)
    assert gain["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    text = scaling_report.markdown(summary, results)
    assert f"+0.1167 ± {gain['se']:.4f} | +{0.35 / 3 / gain['se']:.1f}" in text
    assert "| switch-8 | 1,000 | 10 | 10.0 % / 5.0 % | - |" in text


def test_merge_joins_phases_run_apart_and_refuses_other_settings(tmp_path):
    args = reproduce_scaling.parse_args(["--scale=smoke"])
    common = {k: getattr(args, k) for k in reproduce_scaling.RUN_DEFINING}
    parts = {
        "a": {"args": common, "runs": {"dense": {"0": _run(5.0)}}},
        "b": {"args": common, "runs": {"dense": {"1": _run(5.1)}}, "upcycle": {"u-8": {"0": 1}}},
        "c": {"args": {**common, "steps": 99}, "runs": {}},
    }
    for name, results in parts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    merged = scaling_report.merged([str(tmp_path / "a"), str(tmp_path / "b")])
    assert sorted(merged["runs"]["dense"]) == ["0", "1"] and merged["upcycle"] == {"u-8": {"0": 1}}
    with pytest.raises(SystemExit, match="other settings than .*: steps"):
        scaling_report.merged([str(tmp_path / "a"), str(tmp_path / "c")])
