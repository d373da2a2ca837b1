"""GLUE (v002) and SuperGLUE (v102) as text-to-text seqio tasks, T5's format, mixtures, metrics.

Inputs are "<benchmark> <field>: <text> <field>: <text> ..." (fields in sorted order unless T5
fixes one), targets the label name ("acceptable", "entailment", "True", ...; "<unk>" where the
split has no label); STS-B targets are the score rounded to 0.2 ("3.8"). Task names follow T5:
glue_cola_v002 ... glue_wnli_v002, super_glue_boolq_v102 ...; mixtures glue_v002_proportional
and super_glue_v102_proportional sample tasks in proportion to their training examples.
SuperGLUE's ReCoRD and WSC (which T5 rewrites with dedicated span preprocessors) are not here.
"""

from __future__ import annotations

import functools
import os

import seqio
import tensorflow as tf

from switch_jax.data import registry, task_metrics
from switch_jax.data.errors import DataError, path_exists
from switch_jax.data.vocab import T5_VOCAB, load_vocabulary

GLUE_VERSION, SUPER_GLUE_VERSION = "2.0.0", "1.0.2"


class Benchmark:
    """One GLUE / SuperGLUE dataset: where it lives, how T5 writes it, how it is scored."""

    def __init__(self, suite, name, labels, metric_fns, fields=None, splits=None):
        self.suite, self.name, self.labels = suite, name, labels
        self.metric_fns, self.fields = metric_fns, fields
        self.splits = splits or {"train": "train", "validation": "validation", "test": "test"}

    @property
    def task_name(self) -> str:
        """T5's task name, e.g. glue_cola_v002, super_glue_boolq_v102."""
        return f"glue_{self.name}_v002" if self.suite == "glue" else f"super_glue_{self.name}_v102"

    @property
    def tfds_name(self) -> str:
        """The TFDS dataset the task reads, e.g. glue/cola:2.0.0."""
        version = GLUE_VERSION if self.suite == "glue" else SUPER_GLUE_VERSION
        return f"{self.suite}/{self.name}:{version}"

    def postprocess(self):
        """seqio postprocessor: decoded label text -> what the benchmark's metrics compare."""
        if self.labels is None:
            return task_metrics.string_to_float
        if self.name == "multirc":
            return task_metrics.multirc
        return task_metrics.class_label(self.labels)


_F1_ACC = [task_metrics.f1_with_invalid, task_metrics.accuracy]
_MNLI = {
    "train": "train",
    "validation": "validation_matched",
    "validation_mismatched": "validation_mismatched",
    "test": "test_matched",
}
GLUE = tuple(
    Benchmark("glue", *args)
    for args in (
        ("cola", ("unacceptable", "acceptable"), [task_metrics.matthews_corrcoef]),
        ("sst2", ("negative", "positive"), [task_metrics.accuracy]),
        ("mrpc", ("not_equivalent", "equivalent"), _F1_ACC),
        ("qqp", ("not_duplicate", "duplicate"), _F1_ACC),
        ("stsb", None, [task_metrics.pearson_corrcoef, task_metrics.spearman_corrcoef]),
        ("mnli", ("entailment", "neutral", "contradiction"), [task_metrics.accuracy], None, _MNLI),
        ("qnli", ("entailment", "not_entailment"), [task_metrics.accuracy]),
        ("rte", ("entailment", "not_entailment"), [task_metrics.accuracy]),
        ("wnli", ("not_entailment", "entailment"), [task_metrics.accuracy]),
    )
)
SUPER_GLUE = tuple(
    Benchmark("super_glue", *args)
    for args in (
        ("boolq", ("False", "True"), [task_metrics.accuracy]),
        (
            "cb",
            ("entailment", "contradiction", "neutral"),
            [task_metrics.mean_multiclass_f1(3), task_metrics.accuracy],
        ),
        ("copa", ("choice1", "choice2"), [task_metrics.accuracy]),
        (
            "multirc",
            ("False", "True"),
            [task_metrics.multirc_f1_over_all_answers, task_metrics.multirc_exact_match],
            ("question", "answer", "paragraph"),
        ),
        ("rte", ("entailment", "not_entailment"), [task_metrics.accuracy]),
        ("wic", ("False", "True"), [task_metrics.accuracy], ("sentence1", "sentence2", "word")),
    )
)
MIXTURES = {"glue_v002_proportional": GLUE, "super_glue_v102_proportional": SUPER_GLUE}
BY_TASK = {b.task_name: b for b in GLUE + SUPER_GLUE}


def to_text(example: dict, benchmark: Benchmark) -> dict:
    """T5's `glue` / `stsb` preprocessors: one text-to-text example (tf.data map function)."""
    fields = benchmark.fields or sorted(set(example) - {"label", "idx"})
    parts = [tf.constant(benchmark.name)]
    for key in fields:
        parts += [tf.constant(f"{key}:"), example[key]]
    inputs = tf.strings.join(parts, separator=" ")
    label = example["label"]
    if benchmark.labels is None:  # STS-B: the similarity rounded to the nearest 0.2
        targets = tf.strings.as_string(tf.round(label * 5) / 5, precision=1)
    else:
        names = tf.constant(benchmark.labels)
        # Test splits carry label -1: a target string no prediction can match.
        targets = tf.where(label < 0, "<unk>", tf.gather(names, tf.maximum(label, 0)))
    out = {"inputs": inputs, "targets": targets}
    if benchmark.name == "multirc":
        # Its paragraphs carry HTML line breaks and bold tags, which T5 strips; the ids are kept
        # to group answers by question for the MultiRC metrics.
        out["inputs"] = tf.strings.regex_replace(
            tf.strings.regex_replace(inputs, "<br>", " "), "<(/)?b>", ""
        )
        for key in ("paragraph", "question", "answer"):
            out[f"idx/{key}"] = example["idx"][key]
    else:
        out["idx"] = example["idx"]
    return out


def _check(benchmark: Benchmark, data_dir: str) -> None:
    name, version = benchmark.tfds_name.split(":")
    info = os.path.join(data_dir, name, version, "dataset_info.json")
    if not path_exists(info):
        raise DataError(
            f"TFDS {benchmark.tfds_name} not found in {data_dir} (no {info}); prepare it with "
            f"`tfds build {benchmark.suite} --config {benchmark.name} --data_dir DIR` and pass "
            f"--gin.TFDS_DATA_DIR=DIR"
        )


def register_benchmark(
    benchmark: Benchmark, tfds_data_dir: str | None = None, vocabulary=T5_VOCAB
) -> str:
    """Register one benchmark's task (T5's text format, its metrics); the task name.

    Args:
      benchmark: an entry of GLUE or SUPER_GLUE.
      tfds_data_dir: TFDS data directory holding it (checked now, with the `tfds build` line).
      vocabulary: SentencePiece model path or seqio vocabulary; default T5's C4 vocabulary.
    """
    data_dir = registry.tfds_dir(tfds_data_dir)
    key = (data_dir, registry.vocab_key(vocabulary))
    name = benchmark.task_name
    if registry.is_current(name, key, seqio.TaskRegistry):
        return name
    _check(benchmark, data_dir)
    vocab = load_vocabulary(vocabulary)
    return registry.add_task(
        name,
        key,
        source=seqio.TfdsDataSource(
            benchmark.tfds_name, tfds_data_dir=data_dir, splits=benchmark.splits
        ),
        preprocessors=[
            functools.partial(_map, fn=functools.partial(to_text, benchmark=benchmark)),
            seqio.preprocessors.tokenize,  # keeps inputs_/targets_pretokenized for eval
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
        postprocess_fn=benchmark.postprocess(),
        metric_fns=list(benchmark.metric_fns),
    )


def _map(dataset, fn):
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register_mixture(name: str, tfds_data_dir: str | None = None, vocabulary=T5_VOCAB) -> str:
    """Register every task of the mixture `name` and the mixture (rates = training examples)."""
    data_dir = registry.tfds_dir(tfds_data_dir)
    key = (data_dir, registry.vocab_key(vocabulary))
    if registry.is_current(name, key, seqio.MixtureRegistry):
        return name
    names = [register_benchmark(b, data_dir, vocabulary) for b in MIXTURES[name]]
    return registry.add_mixture(name, key, names, default_rate=seqio.mixing_rate_num_examples)


BUILTIN = {
    **{name: functools.partial(register_benchmark, b) for name, b in BY_TASK.items()},
    **{name: functools.partial(register_mixture, name) for name in MIXTURES},
}
