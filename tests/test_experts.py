"""switch-experts: the report of a trained tiny Switch run against NumPy recomputed from the same
captured routing, the files it writes, and its one-line refusals."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from switch_jax.report import expert_view
from tests.console_entry import invoke

pytest.importorskip("seqio")

E = 8  # models/tiny.gin
CAPACITY_FACTOR = 0.5  # low enough that the report has drops to count
BATCHES = 2


def _parse(model_dir: str, *bindings: str):
    from switch_jax.config import gin_config

    gin_config.parse_gin([os.path.join(model_dir, "config.gin")], list(bindings), [])
    return gin_config.load_configs()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Three steps of the demo config on a (2, 2, 2) mesh: the experts split over 2 devices."""
    from switch_jax.config import gin_config
    from switch_jax.training import trainer

    model_dir = str(tmp_path_factory.mktemp("experts_run"))
    bindings = [
        f"MODEL_DIR = '{model_dir}'",
        "TRAIN_STEPS = 3",
        "BATCH_SIZE = 8",
        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}",
        "MESH_SHAPE = (2, 2, 2)",
        "CHECKPOINT_PERIOD = 3",
        "EVAL_PERIOD = 1000",
        "EVAL_STEPS = 1",
        "LOG_PERIOD = 1",
    ]
    gin_config.parse_gin(["runs/demo.gin"], bindings, [])
    trainer.train(gin_config.load_configs(), operative_config=gin_config.operative_config())
    return model_dir


@pytest.fixture(scope="module")
def captured(model_dir):
    """(run, the captured batches, counts, report) at a capacity factor that drops tokens."""
    from switch_jax.tools import expert_capture
    from switch_jax.training import build

    configs = _parse(model_dir, f"MoeConfig.capacity_factor_eval = {CAPACITY_FACTOR}")
    run = build.build_run(configs)
    step, batches = expert_capture.capture_routing(run, max_batches=BATCHES)
    batches = list(batches)
    counts = expert_capture.new_counts(run.model_cfg)
    for layers in batches:
        for name, routing in layers.items():
            counts[name].add(routing)
    names = {name: str for name in counts}  # ids as text: the report's own namer needs no vocab
    report = expert_view.build_report(counts, names, dead_threshold=0.1, min_count=2)
    return SimpleNamespace(step=step, run=run, batches=batches, counts=counts, report=report)


def _stacked(captured, name: str) -> dict[str, np.ndarray]:
    """One layer's captured arrays over all batches, batches along the row axis."""
    parts = [b[name] for b in captured.batches]
    return {f: np.concatenate([getattr(p, f) for p in parts]) for f in parts[0]._fields}


def _groups(rows: int, length: int, group_size: int, partitions: int) -> int:
    """Mesh TF's group count, written out: the smallest G >= tokens/group_size that divides the
    tokens and is a multiple of the expert partitions."""
    tokens = rows * length
    return next(
        g
        for g in range(-(-tokens // group_size), tokens + 1)
        if tokens % g == 0 and g % partitions == 0
    )


@pytest.mark.parametrize("name", ["encoder/layer_1", "decoder/layer_1"])
def test_counts_shares_and_drops_match_numpy(captured, name):
    moe = captured.run.model_cfg.moe
    layer = next(x for x in captured.report["layers"] if x["name"] == name)
    routed = np.array([x["routed"] for x in layer["experts"]])
    share = np.array([x["share"] for x in layer["experts"]])
    dropped = np.array([x["dropped"] for x in layer["experts"]])
    real_tokens, dropped_ref, expert_real = 0, np.zeros(E, np.int64), []
    for batch in captured.batches:  # routing groups are per batch
        r = batch[name]
        B, L = r.tokens_BL.shape
        G = _groups(B, L, moe.group_size, moe.num_expert_partitions)
        T = B * L // G
        C = min(max(round(CAPACITY_FACTOR * T / E), moe.min_capacity), T)
        expert_GT = r.expert_BLP[..., 0].reshape(G, T)
        real_GT = r.real_BL.reshape(G, T)
        for g in range(G):  # a token's slot: the real tokens before it that chose its expert
            seen = np.zeros(E, np.int64)
            for t in range(T):
                if real_GT[g, t]:
                    e = expert_GT[g, t]
                    dropped_ref[e] += seen[e] >= C
                    assert r.kept_BLP.reshape(G, T)[g, t] == (seen[e] < C)
                    seen[e] += 1
        real_tokens += int(r.real_BL.sum())
        expert_real.append(r.expert_BLP[..., 0][r.real_BL])
    expert_real = np.concatenate(expert_real)
    assert routed.sum() == real_tokens == layer["tokens"]  # top-1: one pick per real token
    np.testing.assert_array_equal(routed, np.bincount(expert_real, minlength=E))
    np.testing.assert_allclose(share, np.bincount(expert_real, minlength=E) / real_tokens)
    np.testing.assert_array_equal(dropped, dropped_ref)
    assert dropped_ref.sum() > 0, "pick a lower CAPACITY_FACTOR: nothing was dropped"


def test_confidence_positions_and_lift_by_hand(captured):
    name = "encoder/layer_1"
    a = _stacked(captured, name)
    layer = next(x for x in captured.report["layers"] if x["name"] == name)
    expert, kept, real = a["expert_BLP"][..., 0], a["kept_BLP"][..., 0], a["real_BL"]
    busiest = int(np.argmax([x["routed"] for x in layer["experts"]]))
    x = layer["experts"][busiest]
    assert x["confidence"] == pytest.approx(
        a["gate_BLP"][..., 0][kept & (expert == busiest)].mean()
    )
    # Positions 0..63 in 4 buckets of 16.
    mine = real & (expert == busiest)
    by_hand = [np.sum(mine & (a["positions_BL"] // 16 == k)) / mine.sum() for k in range(4)]
    np.testing.assert_allclose(x["position_share"], by_hand)
    assert layer["position_buckets"] == ["0-15", "16-31", "32-47", "48-63"]

    token = x["top_tokens"][0]
    t = token["id"]
    in_expert = np.sum(mine & (a["tokens_BL"] == t)) / mine.sum()
    in_corpus = np.sum(real & (a["tokens_BL"] == t)) / real.sum()
    assert token["count"] == np.sum(mine & (a["tokens_BL"] == t))
    assert token["lift"] == pytest.approx(in_expert / in_corpus)
    assert token["token"] == str(t)


def test_dead_experts_are_listed_last():
    c = expert_view.LayerCounts(num_experts=4, vocab_size=10, buckets=2)
    expert_BLP = np.array([[[0], [1], [1], [2]], [[0], [1], [2], [0]]] * 10)  # expert 3: none
    c.add(
        SimpleNamespace(
            expert_BLP=expert_BLP,
            kept_BLP=np.ones_like(expert_BLP, bool),
            gate_BLP=np.full(expert_BLP.shape, 0.5, np.float32),
            tokens_BL=expert_BLP[..., 0] + 5,
            real_BL=np.ones(expert_BLP.shape[:2], bool),
            positions_BL=np.tile(np.arange(4), (20, 1)),
        )
    )
    report = expert_view.build_report({"decoder/layer_1": c}, {"decoder/layer_1": str})
    assert report["dead_experts"] == [
        {"layer": "decoder/layer_1", "expert": 3, "share": 0.0, "load": 0.0}
    ]
    # Token 5 is all of expert 0 (3/8 of the picks) and 3/8 of the text: lift 1 / (3/8).
    (top,) = [t for t in report["layers"][0]["experts"][0]["top_tokens"] if t["id"] == 5]
    assert top["lift"] == pytest.approx(8 / 3)
    assert expert_view.format_table(report).splitlines()[-1].endswith("decoder/layer_1 #3 (0.00%)")


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    """`switch-experts ARGS` in this process: (exit status, stdout, stderr)."""
    status = invoke("experts", args)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_command_prints_the_table_and_writes_json_and_pngs(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"--gin.MODEL_DIR='{model_dir}'", "--max_batches=1", f"--output_dir={out}"]
    status, stdout, stderr = _run(args, capsys)
    assert status == 0, stderr[-2000:]
    assert "encoder/layer_1 (token_choice)" in stdout and "decoder/layer_1" in stdout
    assert "dead experts (load < 0.1x an even share)" in stdout
    report = json.loads((out / "step_3.json").read_text())
    assert report["step"] == 3 and report["batches"] == 1
    assert [x["name"] for x in report["layers"]] == ["encoder/layer_1", "decoder/layer_1"]
    assert all(isinstance(t["token"], str) for t in report["layers"][0]["experts"][0]["top_tokens"])
    for layer in ("encoder_layer_1", "decoder_layer_1"):
        for kind in ("tokens", "load"):
            png = out / f"step_3_{layer}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize(
    "gin, args, message",
    [
        ("ModelConfig.moe = None", [], "dense model: no experts to report"),
        ("ModelConfig.scan_layers = True", [], "ModelConfig.scan_layers=True"),
        ("", ["--step=all"], "--step=all is for switch-eval"),
        ("", ["--max_batches=0"], "flag --max_batches=0"),
    ],
)
def test_refusals_are_one_line(tmp_path, monkeypatch, capsys, gin, args, message):
    os.makedirs(tmp_path / "run" / "checkpoints" / "1" / "state")
    (tmp_path / "run" / "config.gin").write_text(f"include 'runs/demo.gin'\n{gin}\n")
    monkeypatch.chdir(tmp_path)
    status, _, stderr = _run(["--gin.MODEL_DIR=run", *args], capsys)
    assert status != 0
    lines = stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in stderr, stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "config.gin"]
