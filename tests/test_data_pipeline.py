"""make_batches: T5X feature names, packing, determinism, sharding, resuming in a new process."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("seqio")

import data_fixtures  # noqa: E402
from data_fixtures import TINY_LENGTHS, TINY_LM_TASK, TINY_TASK  # noqa: E402

from switch_jax.data import DataError, pipeline  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    data_fixtures.register_tiny_tasks(path)
    return path


def _batches(n, **kwargs):
    args = dict(task_or_mixture=TINY_TASK, feature_lengths=TINY_LENGTHS, batch_size=4, seed=7)
    it = pipeline.make_batches(**{**args, **kwargs})
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_encoder_decoder_batches_are_packed_t5x_features(cache_dir):
    (batch,) = _batches(1)
    assert set(batch) == set(pipeline.ENCODER_DECODER_FEATURES)
    assert {k: v.shape for k, v in batch.items()} == pipeline.batch_shapes(TINY_LENGTHS, 4)
    assert all(v.dtype == np.int32 for v in batch.values())
    seg, pos = batch["encoder_segment_ids"], batch["encoder_positions"]
    # Positions restart at 0 with every new segment; padding has segment 0.
    starts = np.diff(seg, axis=1, prepend=0) != 0
    assert (pos[starts & (seg > 0)] == 0).all()
    assert ((batch["encoder_input_tokens"] != 0) == (seg > 0)).all()
    # Teacher forcing: decoder inputs are targets shifted right within each segment.
    dseg = batch["decoder_segment_ids"]
    first = np.diff(dseg, axis=1, prepend=0) != 0
    shifted = batch["decoder_target_tokens"][:, :-1]
    inner = (~first[:, 1:]) & (dseg[:, 1:] > 0)
    assert (batch["decoder_input_tokens"][:, 1:][inner] == shifted[inner]).all()
    assert (batch["decoder_input_tokens"][first & (dseg > 0)] == 0).all()
    assert ((batch["decoder_loss_weights"] > 0) == (dseg > 0)).all()


def test_decoder_only_batches(cache_dir):
    (batch,) = _batches(
        1,
        task_or_mixture=TINY_LM_TASK,
        architecture="decoder_only",
        feature_lengths={"targets": 32},
    )
    shapes = pipeline.batch_shapes({"targets": 32}, 4, "decoder_only")
    assert {k: v.shape for k, v in batch.items()} == shapes
    assert (batch["decoder_target_tokens"] != 0).mean() > 0.95


def test_same_seed_same_batches_other_seed_or_shard_differs(cache_dir):
    reference = _batches(2)
    assert _same(reference, _batches(2))
    assert not _same(reference, _batches(2, seed=8))
    shard0 = _batches(2, shard_index=0, num_shards=2)
    shard1 = _batches(2, shard_index=1, num_shards=2)
    assert not _same(shard0, shard1)


def test_one_pass_without_shuffle_ends(cache_dir):
    it = pipeline.make_batches(
        TINY_TASK, "validation", TINY_LENGTHS, batch_size=2, shuffle=False, repeat=False
    )
    assert 0 < sum(1 for _ in it) < 1000


def test_restored_iterator_continues_in_a_new_process(cache_dir, tmp_path):
    it = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    for _ in range(5):
        next(it)
    it.save(str(tmp_path / "ckpt"))
    expected = [next(it) for _ in range(3)]
    out = tmp_path / "next.npz"
    script = os.path.join(os.path.dirname(__file__), "data_fixtures.py")
    subprocess.run(
        [sys.executable, script, cache_dir, str(tmp_path / "ckpt"), str(out), "3"],
        check=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    saved = np.load(out)
    got = [{k: saved[f"{i}/{k}"] for k in expected[0]} for i in range(3)]
    assert _same(expected, got)


def test_replay_fallback_matches_and_counts(cache_dir, tmp_path):
    it = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    for _ in range(4):
        next(it)
    it.save(str(tmp_path / "ckpt"))
    expected = [next(it) for _ in range(2)]
    fresh = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    fresh.restore(str(tmp_path / "ckpt"), replay=True)
    assert fresh.batches_consumed == 4
    assert _same(expected, [next(fresh) for _ in range(2)])
    # Without the tf.data files, restore replays on its own.
    for name in os.listdir(tmp_path / "ckpt"):
        if name.startswith("iterator"):
            os.remove(tmp_path / "ckpt" / name)
    fresh = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    fresh.restore(str(tmp_path / "ckpt"))
    assert _same(expected, [next(fresh) for _ in range(2)])


def test_restore_refuses_another_pipeline(cache_dir, tmp_path):
    it = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    next(it)
    it.save(str(tmp_path / "ckpt"))
    other = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=8)
    with pytest.raises(DataError, match="same task, lengths, seed and shard"):
        other.restore(str(tmp_path / "ckpt"))
    with pytest.raises(DataError, match="no saved input position"):
        other.restore(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature_lengths={"inputs": 0, "targets": 16}), r"feature_lengths\['inputs'\]"),
        (dict(feature_lengths={"inputs": 64}), r"feature_lengths\['targets'\]"),
        (dict(batch_size=0), "batch_size"),
        (dict(architecture="encoder"), "architecture"),
        (dict(shard_index=2, num_shards=2), "shard_index"),
        (dict(split="test"), "no split 'test'"),
        (dict(task_or_mixture="nope"), "unknown task"),
    ],
)
def test_bad_arguments_are_clear_errors(cache_dir, kwargs, message):
    with pytest.raises(DataError, match=message):
        _batches(1, **kwargs)
