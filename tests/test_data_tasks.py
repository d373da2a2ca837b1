"""The real C4 / mC4 tasks on tiny on-disk TFDS datasets, text-file tasks, and their errors."""

import os
import subprocess
import sys

import pytest

seqio = pytest.importorskip("seqio")
pytest.importorskip("tensorflow_datasets")

import data_fixtures  # noqa: E402

from switch_jax.data import DataError, pipeline, registry, tasks, vocab  # noqa: E402

LENGTHS = {"inputs": 64, "targets": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(corpus, vocab path, lines of real English text)."""
    built, model = data_fixtures.build_tiny(str(tmp_path_factory.mktemp("tiny")))
    lines = []
    for path in built.train_files:
        with open(path) as f:
            lines += f.read().splitlines()
    return built, model, lines


@pytest.fixture(scope="module")
def c4_dir(tiny, tmp_path_factory):
    _, _, lines = tiny
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data_fixtures.write_tfds(
        data_dir, "c4", "en", "3.0.1", {"train": lines[:150], "validation": lines[150:170]}
    )
    return data_dir


def test_c4_span_corruption_runs_unchanged_on_tfds_c4_en_301(tiny, c4_dir):
    _, model, lines = tiny
    it = pipeline.make_batches(
        "c4_v301_span_corruption",
        "train",
        LENGTHS,
        batch_size=4,
        seed=3,
        tfds_data_dir=c4_dir,
        vocabulary=model,
    )
    batch = next(it)
    assert set(batch) == set(pipeline.ENCODER_DECODER_FEATURES)
    assert batch["encoder_input_tokens"].shape == (4, 64)
    assert batch["decoder_target_tokens"].shape == (4, 16)
    v = vocab.load_vocabulary(model)
    row_inputs = batch["encoder_input_tokens"][0]
    row_targets = batch["decoder_target_tokens"][0]
    # Real text went in: the first sentinel is <extra_id_0>, in both inputs and targets.
    assert row_targets[0] == v.vocab_size - 1 and v.vocab_size - 1 in row_inputs
    decoded = v.decode([t for t in row_inputs if t < v.vocab_size - 100])
    assert len(decoded.split()) > 10
    assert tasks.get_provider("c4_v301_span_corruption").source.tfds_dataset.name == "c4/en:3.0.1"


def test_c4_unpacked_rows_have_t5_lengths(tiny, c4_dir):
    _, model, _ = tiny
    lengths = {"inputs": 512, "targets": 114}
    it = pipeline.make_batches(
        "c4_v301_span_corruption",
        "train",
        lengths,
        batch_size=8,
        seed=0,
        pack=False,
        tfds_data_dir=c4_dir,
        vocabulary=model,
    )
    batch = next(it)
    assert {k: v.shape for k, v in batch.items()} == pipeline.batch_shapes(lengths, 8)
    real_inputs = (batch["encoder_input_tokens"] != 0).sum(axis=1)
    real_targets = (batch["decoder_target_tokens"] != 0).sum(axis=1)
    # 568 raw tokens -> 511 + EOS inputs and 113 + EOS targets (only a concatenation's tail
    # segment may be shorter).
    full = real_inputs == 512
    assert full.sum() >= 6 and (real_targets[full] == 114).all()
    assert (batch["encoder_input_tokens"][full, -1] == 1).all()
    assert (batch["decoder_target_tokens"][full, -1] == 1).all()


def test_c4_lm_task_gives_full_decoder_only_rows(tiny, c4_dir):
    _, model, _ = tiny
    it = pipeline.make_batches(
        "c4_v301_lm",
        "validation",
        {"targets": 32},
        batch_size=2,
        seed=0,
        architecture="decoder_only",
        tfds_data_dir=c4_dir,
        vocabulary=model,
    )
    batch = next(it)
    assert set(batch) == set(pipeline.DECODER_ONLY_FEATURES)
    # Documents are concatenated then split, so rows are full of real tokens.
    assert (batch["decoder_target_tokens"] != 0).all()
    assert (batch["decoder_input_tokens"][:, 1:] == batch["decoder_target_tokens"][:, :-1]).all()


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path, tiny):
    with pytest.raises(DataError, match=r"tfds build c4 --config en .*--tfds_data_dir"):
        tasks.get_provider(
            "c4_v301_span_corruption", tfds_data_dir=str(tmp_path), vocabulary=tiny[1]
        )


def test_mc4_mixture_samples_languages_by_examples_to_the_power_0_3(tiny, tmp_path):
    _, model, lines = tiny
    sizes = {"de": 80, "sw": 10}
    splits = {}
    for i, (lang, n) in enumerate(sizes.items()):
        splits[lang] = lines[i * 100 : i * 100 + n]
        splits[f"{lang}-validation"] = lines[500 + i * 5 : 505 + i * 5]
    data_fixtures.write_tfds(str(tmp_path), "c4", "multilingual", "3.0.1", splits)
    mixture = tasks.get_provider(
        "mc4_span_corruption", tfds_data_dir=str(tmp_path), vocabulary=model, languages=("de", "sw")
    )
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == pytest.approx({f"mc4_span_corruption.{k}": n**0.3 for k, n in sizes.items()})
    batch = next(pipeline.make_batches("mc4_span_corruption", "train", LENGTHS, batch_size=2))
    assert batch["encoder_input_tokens"].shape == (2, 64)


def test_text_file_task_over_a_glob(tiny, tmp_path):
    _, model, lines = tiny
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text("\n".join(lines[i * 40 : (i + 1) * 40]) + "\n\n")
    name = tasks.register_text_files("my_text", str(tmp_path / "part*.txt"), model)
    assert name == "my_text"
    # Registering again is a no-op, not a "task already registered" error.
    tasks.register_text_files("my_text", str(tmp_path / "part*.txt"), model)
    batch = next(pipeline.make_batches("my_text", "train", LENGTHS, batch_size=2, seed=0))
    assert (batch["encoder_segment_ids"] > 0).mean() > 0.9
    with pytest.raises(DataError, match="no files match"):
        tasks.register_text_files("nothing", str(tmp_path / "none*.txt"), model)


def test_embedded_tasks_on_a_pinned_corpus(tiny):
    built, _, _ = tiny
    try:
        names = tasks.register_embedded(
            vocab_size=data_fixtures.TINY_VOCAB_SIZE, corpus_dir=built.directory
        )
        assert names == ("embedded_span_corruption", "embedded_lm")
        span = next(pipeline.make_batches(names[0], "validation", LENGTHS, batch_size=2))
        assert span["decoder_target_tokens"][0, 0] == data_fixtures.TINY_VOCAB_SIZE - 1
        lm = pipeline.make_batches(
            names[1], "train", {"targets": 32}, batch_size=2, architecture="decoder_only"
        )
        assert next(lm)["decoder_target_tokens"].shape == (2, 32)
    finally:
        # Later tests in the session must get the default embedded corpus, not this one.
        for name in ("embedded_span_corruption", "embedded_lm"):
            registry.forget(name)


def test_unknown_task_is_a_clear_error():
    # The closest names, then the two ways to bring one's own data.
    hint = "unknown task or mixture 'c5_span'; did you mean .*embedded_span_corruption.*'jsonl:"
    with pytest.raises(DataError, match=hint + ".*MIXTURE_OR_TASK_MODULE"):
        tasks.get_provider("c5_span")


def test_an_option_a_builtin_task_does_not_take_is_a_clear_error():
    # e.g. VOCABULARY (a converted checkpoint's spiece.model) with the embedded corpus tasks
    with pytest.raises(DataError, match=r"options \['vocabulary'\] do not apply.*embedded_lm"):
        tasks.get_provider("embedded_lm", vocabulary="/tmp/spiece.model")


def test_import_registers_and_builds_nothing(tmp_path):
    code = (
        "import seqio, switch_jax.data.pipeline; "
        "print(sorted(n for n in seqio.TaskRegistry.names() if 'c4' in n or 'embedded' in n))"
    )
    env = dict(os.environ, SWITCH_JAX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "cache").exists()
