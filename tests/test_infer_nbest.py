"""switch-infer's n-best (beams and samples), its sampling seed and its one summary line, on a
tiny float32 Switch model trained 2 steps on the copy task (weights barely trained: the
searches' own outputs are the reference, not the copy)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("seqio")

from switch_jax.config import gin_config  # noqa: E402
from switch_jax.config.settings import DecodeConfig  # noqa: E402
from switch_jax.decode import evaluation, inference  # noqa: E402
from switch_jax.decode.decoding import make_decoder  # noqa: E402
from switch_jax.models.config import ConfigError  # noqa: E402
from switch_jax.store import checkpoints  # noqa: E402
from switch_jax.training import build, losses, trainer  # noqa: E402
from tests import copy_task  # noqa: E402

MODEL_GIN = """
import tests.copy_task
include 'models/tiny.gin'
VOCAB_SIZE = 32
NUM_EXPERTS = 4
MoeConfig.group_size = 64
ModelConfig.d_model = 32
ModelConfig.d_ff = 64
ModelConfig.head_dim = 16
ModelConfig.dtype = 'float32'  # cached decoding = the full scoring pass within 1e-4
"""
RUN = [
    "MIXTURE_OR_TASK_NAME = 'copy_ids'",
    "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}",
    "BATCH_SIZE = 8",
    "MESH_SHAPE = (2, 2, 2)",  # n-best rows sharded over data x expert
    "TRAIN_STEPS = 2",
    "CHECKPOINT_PERIOD = 2",
    "EVAL_PERIOD = 1000",
    "EVAL_STEPS = 0",
]
N = 3
# Ten inputs: two batches of BATCH_SIZE 8, the second padded.
INPUTS = copy_task.sequences("validation")[:10]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbest")
    (root / "model.gin").write_text(MODEL_GIN)
    model_dir = str(root / "run")
    gin_config.parse_gin([str(root / "model.gin")], [*RUN, f"MODEL_DIR = '{model_dir}'"], [])
    configs = gin_config.load_configs()
    trainer.train(configs, operative_config=gin_config.operative_config())
    return model_dir, configs


def _with(configs, **decode):
    return configs.replace(decode=dataclasses.replace(configs.decode, **decode))


def _infer(configs, **decode) -> list[dict]:
    out = io.StringIO()
    inference.infer(_with(configs, **decode), [{"inputs": s} for s in INPUTS], out, progress=None)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _decoder_and_params(configs):
    run = build.build_run(configs, objective=losses.LABELS)
    ckpts = run.checkpoints()
    step_dir = os.fspath(ckpts.step_dir(ckpts.latest_step()))
    ckpts.close()
    params = checkpoints.restore_params(step_dir, run.abstract_params)
    decode_cfg = configs.decode.for_length(configs.data.feature_lengths["targets"])
    return make_decoder(run.model_cfg, run.partitioner, decode_cfg), params


@pytest.fixture(scope="module")
def beam_rows(trained):
    _, configs = trained
    return _infer(configs, beam_size=4, num_return_sequences=N)


def test_beam_nbest_is_the_searchs_own_top_beams_distinct_and_sorted(trained, beam_rows):
    _, configs = trained
    decoder, params = _decoder_and_params(_with(configs, beam_size=4))
    host = evaluation.generation_batch(decoder, [s + [1] for s in INPUTS[:8]], 8)  # EOS ends them
    out = evaluation.to_host(
        decoder.generate(params, evaluation.to_global(decoder.partitioner, host))
    )
    for i, row in enumerate(beam_rows[:8]):
        nbest = row["predictions"]
        assert len(nbest) == N and "seed" not in row
        texts = [tuple(p["tokens"]) for p in nbest]
        assert len(set(texts)) == N, nbest
        scores = [p["score"] for p in nbest]
        assert scores == sorted(scores, reverse=True)
        assert row["prediction"] == nbest[0]["tokens"] and row["score"] == scores[0]
        for k, p in enumerate(nbest):
            length = int(out["beam_lengths"][i, k])
            assert p["tokens"] == evaluation.strip_eos(out["beam_tokens"][i, k], length)
            np.testing.assert_allclose(p["score"], out["beam_scores"][i, k], rtol=1e-6)
            np.testing.assert_allclose(p["log_prob"], out["beam_log_probs"][i, k], rtol=1e-6)


@pytest.fixture(scope="module")
def sampled(trained):
    _, configs = trained
    hot = dict(temperature=2.0, num_return_sequences=N)
    return (
        _infer(configs, seed=0, **hot),
        _infer(configs, seed=0, **hot),
        _infer(configs, seed=1, **hot),
    )


def test_same_seed_same_samples_other_seed_other_samples(sampled):
    first, again, other = sampled
    assert first == again
    assert [r["seed"] for r in first] == [0] * len(INPUTS)
    assert [r["seed"] for r in other] == [1] * len(INPUTS)
    as_samples = [[p["tokens"] for p in r["predictions"]] for r in first]
    assert as_samples != [[p["tokens"] for p in r["predictions"]] for r in other]
    # Each of an input's N rows draws with its own noise: at temperature 2 they differ.
    assert all(len({tuple(t) for t in samples}) > 1 for samples in as_samples)


def test_samples_sorted_and_their_log_probs_are_the_models_scores(trained, sampled):
    _, configs = trained
    rows = sampled[0]
    decoder, params = _decoder_and_params(configs)
    max_length = decoder.config.max_decode_length
    inputs, targets, reported = [], [], []
    for row in rows:
        log_probs = [p["log_prob"] for p in row["predictions"]]
        assert len(log_probs) == N and log_probs == sorted(log_probs, reverse=True)
        assert row["prediction"] == row["predictions"][0]["tokens"]
        for p in row["predictions"]:
            # A sample shorter than MAX_DECODE_LENGTH ended with EOS, which it scored too.
            ended = len(p["tokens"]) < max_length
            inputs.append(row["inputs"] + [1])
            targets.append(p["tokens"] + [1] * ended)
            reported.append(p["log_prob"])
    scored = []
    for start in range(0, len(targets), 8):
        pad = 8 - len(targets[start : start + 8])
        batch = evaluation.score_batch(
            decoder,
            inputs[start : start + 8] + [[]] * pad,
            targets[start : start + 8] + [[]] * pad,
            configs.data.feature_lengths,
        )
        got = decoder.score(params, evaluation.to_global(decoder.partitioner, batch))
        scored.extend(evaluation.to_host(got)[: 8 - pad].tolist())
    # A sampled id 0 (padding: a barely trained model draws it) is masked as padding by the
    # teacher-forced pass's attention but not by cached decoding, so only sequences without it
    # are comparable (15 of the 30 at this seed; all of them agree to ~2e-6).
    clean = [i for i, t in enumerate(targets) if 0 not in t]
    assert len(clean) >= 10, targets
    np.testing.assert_allclose(
        [reported[i] for i in clean], [scored[i] for i in clean], atol=1e-4, rtol=0
    )


def test_cli_ends_with_one_summary_line_with_the_seed(trained, tmp_path):
    model_dir, _ = trained
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": s}) + "\n" for s in INPUTS))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "switch_jax.infer",
            f"--gin.MODEL_DIR='{model_dir}'",
            f"--input_file={inputs}",
            f"--output_file={out}",
            "--gin.TEMPERATURE=2.0",
            f"--gin.NUM_RETURN_SEQUENCES={N}",
            "--gin.DECODE_SEED=7",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("infer:")]
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("infer: step 2, 10 examples, ")
    assert line.endswith(f", seed 7 -> {out}")
    tokens = int(re.search(r"([\d,]+) generated tokens", line).group(1).replace(",", ""))
    rows = [json.loads(r) for r in out.read_text().splitlines()]
    # Every returned sequence counts, EOS included (absent when it ran to the length of 8).
    lengths = [len(p["tokens"]) for r in rows for p in r["predictions"]]
    assert tokens == sum(n + (n < 8) for n in lengths)
    rate = re.search(r"\(([\d,.]+) tokens/s; compiling took ([\d.]+) s more\)", line)
    assert rate and float(rate.group(1).replace(",", "")) > 0, line
    assert [r["seed"] for r in rows] == [7] * len(INPUTS)


def test_nbest_settings_that_cannot_work_are_one_line():
    cases = [
        (dict(beam_size=4, num_return_sequences=5), "NUM_RETURN_SEQUENCES=5 > BEAM_SIZE=4"),
        (dict(num_return_sequences=2), "greedy has one answer; set BEAM_SIZE >= 2 or TEMP"),
        (dict(num_return_sequences=0), "NUM_RETURN_SEQUENCES=0 must be >= 1"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            DecodeConfig(**settings)
        assert "\n" not in str(info.value)
    assert DecodeConfig(beam_size=4, num_return_sequences=4).num_return_sequences == 4
    assert DecodeConfig(temperature=1.0, num_return_sequences=9).num_return_sequences == 9
