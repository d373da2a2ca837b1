"""Dead-expert tracking: per-expert loads of logged steps -> progress note and one-time warnings."""

from __future__ import annotations

import numpy as np

from switch_jax.report import metrics
from switch_jax.report.console import DeadExperts

ENC = "moe/encoder/layer_1/expert_fraction"
DEC = "moe/decoder/layer_3/expert_fraction"
EVEN = [0.25, 0.25, 0.25, 0.25]


def test_streaks_notes_and_one_warning_per_expert():
    # 4 experts: an even share is 0.25, so threshold 0.1 flags loads below 0.025.
    dead = DeadExperts(threshold=0.1, logs=2)
    assert dead.update(10, {ENC: [0.5, 0.49, 0.01, 0.0], DEC: EVEN}) == (None, [])

    note, warnings = dead.update(20, {ENC: [0.5, 0.49, 0.01, 0.0], DEC: EVEN})
    assert note == "dead: enc L1 e2,e3 (2 logs)"
    assert len(warnings) == 1
    assert "step 20: dead experts 2, 3 in encoder layer 1 (under 0.1x" in warnings[0]

    # 0.03 >= 0.025: expert 2 receives tokens again and its count restarts.
    assert dead.update(30, {ENC: [0.5, 0.47, 0.03, 0.0], DEC: EVEN}) == (
        "dead: enc L1 e3 (3 logs)",
        [],
    )
    assert dead.update(40, {ENC: [0.5, 0.5, 0.0, 0.0], DEC: EVEN})[0] == "dead: enc L1 e3 (4 logs)"
    # Expert 2 dead again: named in the note, but it was warned about once already.
    assert dead.update(50, {ENC: [0.5, 0.5, 0.0, 0.0], DEC: EVEN}) == (
        "dead: enc L1 e2,e3 (5 logs)",
        [],
    )


def test_several_layers_and_many_dead_experts():
    dead = DeadExperts(threshold=0.5, logs=1)
    # 8 experts: an even share is 0.125, so below 0.0625 is dead: experts 1..6 of the decoder.
    dec = [0.5, 0.06, 0.0, 0.01, 0.0, 0.03, 0.0, 0.4]
    enc = [0.3, 0.3, 0.3, 0.1]  # 4 experts, limit 0.125: expert 3 only
    note, warnings = dead.update(7, {DEC: dec, ENC: enc, "moe/decoder/layer_3/other": [0.0]})
    assert note == "dead: dec L3 e1,e2,e3,e4+2; enc L1 e3 (1 logs)"
    assert [w.split(" (under")[0] for w in warnings] == [
        "warning: step 7: dead experts 1, 2, 3, 4, 5, 6 in decoder layer 3",
        "warning: step 7: dead experts 3 in encoder layer 1",
    ]


def test_progress_line_carries_the_note(tmp_path, capsys):
    logger = metrics.MetricsLogger(
        str(tmp_path), total_steps=20, console=True, dead_experts=(0.1, 2)
    )
    fraction = np.array([[0.6, 0.4, 0.0, 0.0]], np.float32)  # one sparse encoder layer
    step_metrics = {"loss": 3.0, "encoder/expert_fraction": fraction}
    for step in (10, 20):
        logger.log_train(step, step_metrics, step_time=0.1, tokens=100)
    logger.close()
    first, warning, second = capsys.readouterr().out.strip().splitlines()
    assert "dead" not in first
    assert warning.startswith("warning: step 20: dead experts 2, 3 in encoder layer 0 (")
    assert "| expert load 0.00-2.40x | dead: enc L0 e2,e3 (2 logs) |" in second


def test_threshold_zero_turns_it_off(tmp_path, capsys):
    logger = metrics.MetricsLogger(str(tmp_path), total_steps=9, console=True, dead_experts=(0, 1))
    logger.log_train(9, {"encoder/expert_fraction": np.array([[1.0, 0.0]])}, step_time=1, tokens=1)
    logger.close()
    assert "dead" not in capsys.readouterr().out
