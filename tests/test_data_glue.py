"""GLUE / SuperGLUE on tiny real on-disk TFDS data, their metrics by hand, the docstring task."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

import data_fixtures  # noqa: E402

from switch_jax.data import docstrings, glue, pipeline, tasks  # noqa: E402
from switch_jax.data import task_metrics as m  # noqa: E402
from switch_jax.decode import evaluation  # noqa: E402

LENGTHS = {"inputs": 48, "targets": 6}
WORDS = "the cat sat on a mat while two dogs ran past".split()


def fake_rows(features, n: int, seed: int, labelled: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {}
        for key, feature in features.items():
            if isinstance(feature, tfds.features.Text):
                row[key] = f"{key} {i} " + " ".join(rng.choices(WORDS, k=4))
            elif isinstance(feature, tfds.features.ClassLabel):
                row[key] = i % feature.num_classes if labelled else -1
            elif isinstance(feature, tfds.features.FeaturesDict):  # MultiRC's idx
                row[key] = {"paragraph": 0, "question": i // 2, "answer": i}
            elif key == "label":  # STS-B similarity in [0, 5]
                row[key] = (i * 0.77) % 5.0
            else:
                row[key] = i
        rows.append(row)
    return rows


def write_benchmark(data_dir: str, benchmark: glue.Benchmark, num_train: int) -> None:
    name, version = benchmark.tfds_name.split(":")
    suite, config = name.split("/")
    features = tfds.builder(name, data_dir=data_dir).info.features
    splits = {}
    for i, split in enumerate(benchmark.splits.values()):
        n = num_train if split == "train" else 5
        splits[split] = fake_rows(features, n, seed=i, labelled=not split.startswith("test"))
    data_fixtures.write_tfds_rows(data_dir, suite, config, version, features, splits)


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    return data_fixtures.build_tiny(str(tmp_path_factory.mktemp("tiny")))[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Every GLUE and SuperGLUE dataset, with 4 + i training examples for the i-th one."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for i, benchmark in enumerate(glue.GLUE + glue.SUPER_GLUE):
        write_benchmark(data_dir, benchmark, num_train=4 + i)
    return data_dir


def _first(task: str, split: str, tfds_dir: str, vocab_path: str) -> dict:
    tasks.get_provider(task, tfds_data_dir=tfds_dir, vocabulary=vocab_path)
    return evaluation.task_examples(task, split, LENGTHS, max_examples=1)[0]


def _texts(example) -> tuple[str, str]:
    return example["inputs_pretokenized"].decode(), example["targets_pretokenized"].decode()


def test_glue_examples_are_t5_text_to_text(tfds_dir, vocab_path):
    inputs, targets = _texts(_first("glue_cola_v002", "validation", tfds_dir, vocab_path))
    assert inputs.startswith("cola sentence: sentence 0 ") and targets == "unacceptable"
    # Fields in sorted order; MNLI's validation split is validation_matched.
    inputs, targets = _texts(_first("glue_mnli_v002", "validation", tfds_dir, vocab_path))
    assert inputs.startswith("mnli hypothesis: hypothesis 0 ") and " premise: premise 0 " in inputs
    assert targets == "entailment"
    mismatched = _first("glue_mnli_v002", "validation_mismatched", tfds_dir, vocab_path)
    assert _texts(mismatched)[0].startswith("mnli hypothesis:")
    # STS-B: the score rounded to 0.2 with one decimal (row 1: 0.77 -> "0.8").
    options = dict(tfds_data_dir=tfds_dir, vocabulary=vocab_path)
    rows = evaluation.task_examples("glue_stsb_v002", "validation", LENGTHS, 2, **options)
    assert [_texts(r)[1] for r in rows] == ["0.0", "0.8"]
    # Unlabelled test rows get "<unk>".
    test_row = _first("glue_rte_v002", "test", tfds_dir, vocab_path)
    assert _texts(test_row)[1] == "<unk>"


def test_super_glue_examples_and_multirc_fields(tfds_dir, vocab_path):
    ex = _first("super_glue_multirc_v102", "validation", tfds_dir, vocab_path)
    inputs, targets = _texts(ex)
    # T5's fixed field order for MultiRC, and the question index kept for grouped metrics.
    assert inputs.startswith("multirc question: question 0 ") and targets == "False"
    assert inputs.index(" answer: ") < inputs.index(" paragraph: ")
    assert int(ex["idx/question"]) == 0
    inputs, _ = _texts(_first("super_glue_wic_v102", "validation", tfds_dir, vocab_path))
    assert inputs.startswith("wic sentence1: ") and " word: word 0 " in inputs
    _, targets = _texts(_first("super_glue_copa_v102", "validation", tfds_dir, vocab_path))
    assert targets == "choice1"


@pytest.mark.parametrize("mixture", ["glue_v002_proportional", "super_glue_v102_proportional"])
def test_mixtures_sample_tasks_in_proportion_to_examples(mixture, tfds_dir, vocab_path):
    provider = tasks.get_provider(mixture, tfds_data_dir=tfds_dir, vocabulary=vocab_path)
    everything = glue.GLUE + glue.SUPER_GLUE
    want = {b.task_name: 4 + everything.index(b) for b in glue.MIXTURES[mixture]}
    assert {t.name: provider.get_rate(t) for t in provider.tasks} == want
    it = pipeline.make_batches(mixture, "train", LENGTHS, batch_size=4, seed=0, pack=False)
    batch = next(it)
    assert batch["encoder_input_tokens"].shape == (4, 48)
    assert (batch["decoder_target_tokens"][:, 0] > 0).all()


def test_missing_glue_data_says_how_to_prepare_it(tmp_path, vocab_path):
    with pytest.raises(tasks.DataError, match=r"tfds build glue --config cola"):
        tasks.get_provider("glue_cola_v002", tfds_data_dir=str(tmp_path), vocabulary=vocab_path)


def test_task_metrics_on_fixed_predictions(tfds_dir, vocab_path):
    tasks.get_provider("glue_mrpc_v002", tfds_data_dir=tfds_dir, vocabulary=vocab_path)
    examples = evaluation.task_examples("glue_mrpc_v002", "validation", LENGTHS)
    # Labels are i % 2: not_equivalent, equivalent, not_equivalent, equivalent, not_equivalent.
    preds = ["equivalent", "equivalent", "banana", "not_equivalent", "not_equivalent"]
    # -> [1, 1, invalid(counts wrong: 1), 0, 0] vs [0, 1, 0, 1, 0]: tp 1, fp 2, fn 1.
    got = evaluation.task_metrics("glue_mrpc_v002", examples, preds)
    assert got == pytest.approx({"f1": 100 * 2 / (2 + 2 + 1), "accuracy": 40.0})
    tasks.get_provider("super_glue_multirc_v102", tfds_data_dir=tfds_dir, vocabulary=vocab_path)
    examples = evaluation.task_examples("super_glue_multirc_v102", "validation", LENGTHS)
    # Questions i // 2 = 0, 0, 1, 1, 2; labels False, True, False, True, False.
    preds = ["False", "True", "True", "True", "False"]
    got = evaluation.task_metrics("super_glue_multirc_v102", examples, preds)
    assert got == pytest.approx({"f1a": 100 * 2 * 2 / (2 * 2 + 1 + 0), "exact_match": 200 / 3})


# ----------------------------------------------------------------------------- metrics by hand


def test_classification_metrics_by_hand():
    assert m.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
    # invalid -1 at index 1 becomes wrong (0): p = [1, 0, 1, 0, 0]: tp 1, fp 1, fn 2.
    assert m.f1_with_invalid([1, 1, 0, 0, 1], [1, -1, 1, 0, 0]) == {"f1": pytest.approx(40.0)}
    # TP 3, TN 3, FP 1, FN 1: (9 - 1) / sqrt(4^4) = 0.5.
    t, p = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0]
    assert m.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(50.0)
    assert m.matthews_corrcoef([0, 1, 0], [1, 1, 1])["matthews_corrcoef"] == 0.0
    # Per-class F1: 1, 0.5, 0.5.
    got = m.mean_multiclass_f1(3)([0, 1, 2, 0, 1, 2], [0, 1, 1, 0, 2, 2])
    assert got == {"mean_3class_f1": pytest.approx(200 / 3)}
    assert m.exact_match(["json", "xml", "email"], ["json", "xml", "http"]) == {
        "exact_match": pytest.approx(200 / 3)
    }


def _pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx, dy = x - x.sum() / len(x), y - y.sum() / len(y)
    return (dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum())


def test_correlations_by_hand():
    t, p = [1, 2, 3, 4], [2, 4, 5, 9]
    assert m.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(100 * _pearson(t, p))
    # Ranks with a tie: p = [5, 6, 6, 8, 7] -> [1, 2.5, 2.5, 5, 4].
    got = m.spearman_corrcoef([1, 2, 3, 4, 5], [5, 6, 6, 8, 7])["spearman_corrcoef"]
    assert got == pytest.approx(100 * _pearson([1, 2, 3, 4, 5], [1, 2.5, 2.5, 5, 4]))


def test_postprocessors():
    post = m.class_label(("unacceptable", "acceptable"))
    assert [post(b" acceptable"), post("unacceptable"), post("maybe")] == [1, 0, -1]
    assert m.string_to_float("3.8") == 3.8 and m.string_to_float("three") == -1.0
    target = m.multirc("True", example={"idx/question": np.int32(7)}, is_target=True)
    assert target == {"value": 1, "group": 7} and m.multirc("nope") == {"value": -1}


# ----------------------------------------------------------------------------- docstring task


def test_docstring_task_is_offline_deterministic_and_held_out(vocab_path):
    train, validation = docstrings.examples("train"), docstrings.examples("validation")
    assert len(train) > 1000 and len(validation) > 150
    assert not {i for i, _ in train} & {i for i, _ in validation}
    assert {t for _, t in validation} == set(docstrings.PACKAGES)
    assert all(i.startswith("package: ") for i, _ in train)
    tasks.get_provider("docstring_package", vocabulary=vocab_path)
    examples = evaluation.task_examples("docstring_package", "validation", LENGTHS, 4)
    assert [ex["targets_pretokenized"].decode() for ex in examples] == [
        t for _, t in validation[:4]
    ]
    assert evaluation.task_metrics(
        "docstring_package", examples, [t for _, t in validation[:3]] + ["nope"]
    ) == {"exact_match": 75.0}
