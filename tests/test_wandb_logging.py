"""Weights & Biases logging (WANDB_PROJECT): an offline run holds the scalars metrics.jsonl holds.

wandb is an optional extra (`pip install 'switch_jax[wandb]'`); without it the run test skips.
The offline run file is read back here with a small reader of its record log (W&B's leveldb-style
format: 32 KiB blocks of [crc32, length, type] chunks, each record a `Record` protobuf), since
wandb 0.31 reads history back only through its online API.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import sys

import pytest

from switch_jax.config.settings import TrainConfig
from switch_jax.models.config import ConfigError
from switch_jax.report import wandb_log
from switch_jax.store import model_dir as model_dir_lib

STEPS = 3


def _records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    block, pos, pieces, records = 32768, 7, b"", []  # 7: the file's ':W&B' header
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pieces += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def _history(path: str) -> dict[int, dict]:
    rows = {}
    for record in _records(path):
        if record.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            rows[row["_step"]] = row
    return rows


def _train(model_dir: str, wandb_dir: str, steps: int) -> list[str]:
    """Train the tiny demo model with W&B offline; returns the offline run files so far."""
    from switch_jax.config import gin_config
    from switch_jax.training import trainer

    env = {"WANDB_MODE": "offline", "WANDB_DIR": wandb_dir, "WANDB_SILENT": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        bindings = [
            f"MODEL_DIR = '{model_dir}'",
            f"TRAIN_STEPS = {steps}",
            "BATCH_SIZE = 8",
            "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
            "MESH_SHAPE = (-1, 1, 1)",
            "EVAL_STEPS = 0",
            "LOG_PERIOD = 1",
            "WANDB_PROJECT = 'switch_jax_test'",
        ]
        gin_config.parse_gin(["runs/demo.gin"], bindings, [])
        trainer.train(gin_config.load_configs(), operative_config=gin_config.operative_config())
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("seqio")
    root = tmp_path_factory.mktemp("wandb")
    model_dir, wandb_dir = str(root / "tiny_run"), str(root / "wandb_dir")
    os.makedirs(wandb_dir)
    runs = _train(model_dir, wandb_dir, STEPS)
    assert len(runs) == 1, runs
    return model_dir, runs[0], wandb_dir


def test_offline_history_equals_metrics_jsonl(offline_run):
    model_dir, run_file, _ = offline_run
    with open(model_dir_lib.metrics_file(model_dir, "train")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    history = _history(run_file)
    assert sorted(history) == list(range(1, STEPS + 1))
    for row in rows:
        logged = history[row["step"]]
        for key in ("loss", "cross_entropy", "learning_rate", "grad_norm", "num_tokens"):
            assert logged[f"train/{key}"] == pytest.approx(row[key], rel=1e-6), key
    assert isinstance(rows[0]["num_tokens"], int)  # a count, not 917.2


def test_run_is_named_and_configured_and_resumable(offline_run):
    model_dir, run_file, _ = offline_run
    stored = model_dir_lib.wandb_id_file(model_dir).read_text().strip()
    assert run_file.endswith(f"run-{stored}.wandb")  # the id a resumed run will continue
    records = _records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny_run" and run.project == "switch_jax_test"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["TrainConfig.train_steps"] == STEPS
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished


def test_resumed_training_continues_the_same_run(offline_run):
    model_dir, first, wandb_dir = offline_run
    runs = _train(model_dir, wandb_dir, STEPS + 1)  # resumes from the checkpoint at STEPS
    (second,) = set(runs) - {first}
    assert os.path.basename(second) == os.path.basename(first)  # the same W&B run id
    assert sorted(_history(second)) == [STEPS + 1]


def test_stored_id_is_reused(tmp_path):
    made = iter(["first", "second"])
    assert wandb_log.run_id(str(tmp_path), lambda: next(made)) == "first"
    assert wandb_log.run_id(str(tmp_path), lambda: next(made)) == "first"


def test_missing_wandb_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = dataclasses.replace(TrainConfig(), wandb_project="p")
    with pytest.raises(ConfigError, match=r"pip install 'switch_jax\[wandb\]'") as error:
        wandb_log.start(cfg, str(tmp_path), settings={}, is_chief=False)
    assert "\n" not in str(error.value) and "WANDB_PROJECT='p'" in str(error.value)
    assert wandb_log.start(TrainConfig(), str(tmp_path), settings={}, is_chief=True) is None
