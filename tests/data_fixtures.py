"""Small real data for the data tests: a stdlib-docstring corpus, its vocab, a tiny TFDS c4."""

from __future__ import annotations

import os
import sys
import sysconfig

os.environ.setdefault("NO_GCE_CHECK", "true")

# A few stdlib packages give ~0.5 MB of English docstrings: enough to train a small vocab in
# seconds, and present on every Python.
_STDLIB = sysconfig.get_paths()["stdlib"]
_PACKAGES = ("email", "json", "logging", "unittest", "asyncio", "concurrent", "importlib", "xml")
TINY_ROOTS = [os.path.join(_STDLIB, p) for p in _PACKAGES]
TINY_VOCAB_SIZE = 1000
TINY_TASK = "tiny_text_span_corruption"
TINY_LM_TASK = "tiny_text_lm"
TINY_LENGTHS = {"inputs": 64, "targets": 16}


def build_tiny(cache_dir: str):
    """(corpus, vocab path) of the tiny stdlib corpus, cached in `cache_dir`."""
    from switch_jax.data import corpus

    tiny = corpus.build_corpus(roots=TINY_ROOTS, max_bytes=600_000, cache_dir=cache_dir)
    return tiny, corpus.build_vocab(tiny, vocab_size=TINY_VOCAB_SIZE)


def register_tiny_tasks(cache_dir: str) -> tuple[str, str]:
    """Register span-corruption and LM text-file tasks over the tiny corpus."""
    from switch_jax.data import tasks

    tiny, model = build_tiny(cache_dir)
    for name, objective in ((TINY_TASK, "span_corruption"), (TINY_LM_TASK, "lm")):
        tasks.register_text_files(
            name,
            list(tiny.train_files),
            model,
            tiny.validation_file,
            objective=objective,
            shuffle_buffer_size=128,  # seqio's 1000 would make every first batch slow here
        )
    return TINY_TASK, TINY_LM_TASK


def write_tfds(data_dir: str, name: str, config: str, version: str, splits: dict) -> str:
    """Write a real on-disk TFDS c4-like dataset (dataset_info.json, features.json, tfrecords).

    tfds mock_data cannot mock c4 3.0.1 (its code is at 3.1.0), but tfds reads any prepared
    version from files, so the test writes the files the way a prepared copy has them.

    Args:
      data_dir: TFDS data directory.
      name, config, version: e.g. 'c4', 'en', '3.0.1'.
      splits: split name -> list of texts.
    """
    import tensorflow_datasets as tfds

    keys = ("content-length", "content-type", "text", "timestamp", "url")
    features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in keys})
    rows = {
        split: [
            {
                "content-length": str(len(t)),
                "content-type": "text/plain",
                "text": t,
                "timestamp": "2019-04-25T12:57:54Z",
                "url": f"https://example.com/{split}/{i}",
            }
            for i, t in enumerate(texts)
        ]
        for split, texts in splits.items()
    }
    return write_tfds_rows(data_dir, name, config, version, features, rows)


def write_tfds_rows(data_dir, name, config, version, features, splits: dict) -> str:
    """Write split name -> list of example dicts as a prepared TFDS dataset with `features`."""
    import tensorflow_datasets as tfds

    directory = os.path.join(data_dir, name, config, version)
    os.makedirs(directory, exist_ok=True)
    identity = tfds.core.dataset_info.DatasetIdentity(
        name=name,
        version=tfds.core.Version(version),
        config_name=config,
        data_dir=directory,
        module_name=f"tensorflow_datasets.text.{name}",
    )
    writer = tfds.core.SequentialWriter(
        tfds.core.DatasetInfo(builder=identity, features=features), max_examples_per_shard=50
    )
    writer.initialize_splits(list(splits))
    for split, rows in splits.items():
        writer.add_examples({split: rows})
    writer.close_splits(list(splits))
    return directory


def _restore_main(cache_dir: str, ckpt: str, out: str, num_batches: int) -> None:
    """Subprocess side of the resume test: rebuild the iterator, restore, write next batches."""
    import numpy as np

    from switch_jax.data import pipeline

    register_tiny_tasks(cache_dir)
    it = pipeline.make_batches(TINY_TASK, "train", TINY_LENGTHS, batch_size=4, seed=7)
    it.restore(ckpt)
    batches = [next(it) for _ in range(num_batches)]
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})


if __name__ == "__main__":
    _restore_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
