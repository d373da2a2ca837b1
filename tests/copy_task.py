"""`copy_ids`: a seqio task over token ids whose target is its input (registered on import, so a
gin file can `import tests.copy_task`, as T5X users import their task modules)."""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from switch_jax.data import task_metrics

TASK = "copy_ids"
VOCAB_SIZE = 32
FIRST_ID = 3  # 0 pad, 1 EOS, 2 unk
LENGTHS = (3, 6)
NUM_EXAMPLES = {"train": 20_000, "validation": 64}


def sequences(split: str) -> list[list[int]]:
    """Fixed random id sequences; validation ones never occur in train."""
    rng = np.random.default_rng({"train": 0, "validation": 1}[split])
    out, train = [], set()
    if split == "validation":
        train = {tuple(s) for s in sequences("train")}
    while len(out) < NUM_EXAMPLES[split]:
        seq = rng.integers(FIRST_ID, VOCAB_SIZE, rng.integers(*LENGTHS, endpoint=True)).tolist()
        if tuple(seq) not in train:
            out.append(seq)
    return out


def _dataset(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    ragged = tf.ragged.constant(sequences(split), dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices(ragged).map(lambda s: {"inputs": s, "targets": s})


if TASK not in seqio.TaskRegistry.names():
    vocab = seqio.PassThroughVocabulary(VOCAB_SIZE, eos_id=1)
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
        metric_fns=[task_metrics.exact_match],
    )
