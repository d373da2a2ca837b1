"""Packed, sharded, resumable NumPy batches from a seqio task with T5X's model feature names.

it = make_batches("embedded_span_corruption", "train", {"inputs": 512, "targets": 114},
                  batch_size=8, seed=0, shard_index=jax.process_index(),
                  num_shards=jax.process_count())
batch = next(it)              # dict of np.int32 [batch_size, length]
it.save(f"{ckpt_dir}/data/process_{jax.process_index()}")   # per process
it.restore(same_path)         # next(it) continues exactly; replays N batches if needed
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from switch_jax.data import files, tasks
from switch_jax.data.errors import DataError

ARCHITECTURES = ("encoder_decoder", "decoder_only")
ENCODER_DECODER_FEATURES = (
    "encoder_input_tokens",
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)
DECODER_ONLY_FEATURES = ENCODER_DECODER_FEATURES[3:]
_ITERATOR_PREFIX = "iterator"
_STATE_FILE = "input_state.json"


def _keep_tf_off_accelerators() -> None:
    # TensorFlow would otherwise reserve GPU memory that JAX needs; input work is CPU-only.
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass


def _check_args(feature_lengths, batch_size, architecture, shard_index, num_shards) -> None:
    if architecture not in ARCHITECTURES:
        raise DataError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    needed = ("inputs", "targets") if architecture == "encoder_decoder" else ("targets",)
    for key in needed:
        value = feature_lengths.get(key)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise DataError(
                f"feature_lengths['{key}'] must be a positive int for {architecture}, got "
                f"{value!r} (e.g. {{'inputs': 512, 'targets': 114}})"
            )
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < num_shards:
        raise DataError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")


def _single_segment(example):
    """Unpacked rows get segment ids and positions too, so the model sees one set of keys."""
    for side, tokens in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
        if tokens in example:
            real = tf.cast(example[tokens] != 0, tf.int32)
            example[f"{side}_segment_ids"] = real
            example[f"{side}_positions"] = tf.range(tf.size(real), dtype=tf.int32) * real
    return example


def batch_shapes(
    feature_lengths: Mapping[str, int], batch_size: int, architecture: str = "encoder_decoder"
) -> dict[str, tuple[int, int]]:
    """Shapes of the int32 arrays `make_batches` yields, without building a pipeline."""
    if architecture == "encoder_decoder":
        enc = (batch_size, feature_lengths["inputs"])
        dec = (batch_size, feature_lengths["targets"])
        return {k: enc if k.startswith("encoder") else dec for k in ENCODER_DECODER_FEATURES}
    return {k: (batch_size, feature_lengths["targets"]) for k in DECODER_ONLY_FEATURES}


def make_dataset(
    task_or_mixture: str,
    split: str = "train",
    feature_lengths: Mapping[str, int] | None = None,
    batch_size: int = 8,
    architecture: str = "encoder_decoder",
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    pack: bool = True,
    shuffle: bool = True,
    repeat: bool = True,
    **task_options,
) -> tf.data.Dataset:
    """The batched tf.data pipeline behind `make_batches` (same arguments)."""
    feature_lengths = dict(feature_lengths or tasks.SPAN_CORRUPTION_LENGTHS)
    if architecture == "decoder_only" and "inputs" in feature_lengths:
        feature_lengths.pop("inputs")  # a plain LM; PrefixLM is out of scope here
    _check_args(feature_lengths, batch_size, architecture, shard_index, num_shards)
    _keep_tf_off_accelerators()
    provider = tasks.get_provider(task_or_mixture, **task_options)
    if split not in provider.splits:
        hint = " (add validation=FILES to it)" if files.is_spec(task_or_mixture) else ""
        raise DataError(
            f"{task_or_mixture} has no split {split!r}{hint}; it has {list(provider.splits)} "
            "(EVAL_STEPS=0 trains without the validation split)"
        )
    if architecture == "decoder_only" and "inputs" in provider.output_features:
        # DecoderFeatureConverter would silently drop the inputs: train on targets alone.
        raise DataError(
            f"{task_or_mixture} has an 'inputs' feature, which a decoder-only model does not "
            "read; use its LM task (e.g. embedded_lm, or objective=lm on your files)"
        )
    if architecture == "encoder_decoder":
        converter = seqio.EncDecFeatureConverter(pack=pack)
    else:
        converter = seqio.DecoderFeatureConverter(pack=pack)
    dataset = seqio.get_dataset(
        provider,
        task_feature_lengths=feature_lengths,
        feature_converter=converter,
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=None if repeat else 1,
        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
        verbose=False,
        seed=seed,
    )
    if not pack:
        dataset = dataset.map(_single_segment, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.prefetch(2)


class BatchIterator(Iterator):
    """Iterator of dict[str, np.ndarray] batches whose position can be saved and restored."""

    def __init__(self, dataset_fn: Callable[[], tf.data.Dataset], description: Mapping):
        self.description = dict(description)
        self._dataset_fn = dataset_fn
        self._start()

    def _start(self) -> None:
        # A new dataset object, not just a new iterator: a second iterator over the same
        # dataset draws fresh shuffle and span-corruption seeds and so a different stream.
        self.dataset = self._dataset_fn()
        self._iterator = iter(self.dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self.batches_consumed = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.batches_consumed += 1
        return {k: v.numpy() for k, v in batch.items()}

    def skip(self, num_batches: int) -> None:
        """Advance by `num_batches` without converting them (the replay fallback)."""
        for _ in range(num_batches):
            next(self._iterator)
        self.batches_consumed += num_batches

    def save(self, path: str) -> None:
        """Write the iterator state and the batch count under directory `path` (one per process).

        Args:
          path: a directory (local or gs://) private to this process.
        """
        tf.io.gfile.makedirs(path)
        self._checkpoint.write(os.path.join(path, _ITERATOR_PREFIX))
        state = {"batches_consumed": self.batches_consumed, "description": self.description}
        with tf.io.gfile.GFile(os.path.join(path, _STATE_FILE), "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)

    def restore(self, path: str, replay: bool = False) -> None:
        """Continue from a `save(path)`: next() then yields what the saved iterator would have.

        Args:
          path: the directory given to `save`.
          replay: ignore the saved tf.data state and rebuild the position by skipping the
            recorded number of batches from a fresh iterator; also used automatically when the
            iterator files are missing or unreadable (e.g. after a TensorFlow upgrade).
        """
        state_file = os.path.join(path, _STATE_FILE)
        if not tf.io.gfile.exists(state_file):
            raise DataError(f"no saved input position at {path} (missing {_STATE_FILE})")
        with tf.io.gfile.GFile(state_file) as f:
            state = json.load(f)
        if state["description"] != json.loads(json.dumps(self.description)):
            raise DataError(
                f"saved input at {path} was made with {state['description']}, not "
                f"{self.description}; restore with the same task, lengths, seed and shard"
            )
        if not replay:
            try:
                self._checkpoint.read(os.path.join(path, _ITERATOR_PREFIX)).assert_consumed()
                self.batches_consumed = state["batches_consumed"]
                return
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                logging.warning("input iterator state unreadable (%s); replaying batches", e)
        self._start()
        self.skip(state["batches_consumed"])


def make_batches(
    task_or_mixture: str,
    split: str = "train",
    feature_lengths: Mapping[str, int] | None = None,
    batch_size: int = 8,
    architecture: str = "encoder_decoder",
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    pack: bool = True,
    shuffle: bool = True,
    repeat: bool = True,
    **task_options,
) -> BatchIterator:
    """Batches of one host's shard of a seqio task or mixture, packed like T5X.

    Encoder-decoder batches hold ENCODER_DECODER_FEATURES (seqio.EncDecFeatureConverter),
    decoder-only ones DECODER_ONLY_FEATURES (seqio.DecoderFeatureConverter); each is an int32
    array [batch_size, length]. The stream is a deterministic function of the arguments.

    Args:
      task_or_mixture: e.g. 'embedded_span_corruption', 'c4_v301_span_corruption', 'embedded_lm'.
      split: 'train' or 'validation'.
      feature_lengths: task lengths, default {'inputs': 512, 'targets': 114}; decoder-only uses
        'targets' only.
      batch_size: rows per batch on this host (the global batch / num_shards).
      architecture: 'encoder_decoder' or 'decoder_only'.
      seed: seeds shuffling and span corruption.
      shard_index: this host's index (jax.process_index()).
      num_shards: number of hosts (jax.process_count()).
      pack: pack several examples per row (segment ids and positions mark them); unpacked
        rows carry the same keys, with segment id 1 on real tokens.
      shuffle: shuffle files and examples.
      repeat: repeat forever (training); False gives one pass.
      **task_options: for built-in tasks, e.g. tfds_data_dir=..., vocabulary=..., vocab_size=...
    """
    args = dict(
        task_or_mixture=task_or_mixture,
        split=split,
        feature_lengths=dict(feature_lengths or tasks.SPAN_CORRUPTION_LENGTHS),
        batch_size=batch_size,
        architecture=architecture,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
        pack=pack,
        shuffle=shuffle,
        repeat=repeat,
    )
    return BatchIterator(lambda: make_dataset(**args, **task_options), description=args)
