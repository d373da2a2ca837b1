"""Embedded corpus and vocabularies: deterministic builds, T5 ids, sentinels, clear errors."""

import os
import time

import pytest

pytest.importorskip("sentencepiece")
seqio = pytest.importorskip("seqio")

import data_fixtures  # noqa: E402

from switch_jax.data import DataError, corpus, vocab  # noqa: E402

PROSE = (
    '"""Return the number of items in the queue, which may be zero when it is empty.'
    '\n\nThe count is only a hint: another thread can add or remove an item at any time."""\n'
)


def _write_sources(root):
    os.makedirs(root / "pkg", exist_ok=True)
    (root / "pkg" / "good.py").write_text(
        f"def size():\n    {PROSE}    return 0\n\n"
        'class Box:\n    """A box that holds the value of an item and a label for it."""\n'
    )
    (root / "pkg" / "copy.py").write_text(f"def other():\n    {PROSE}")  # duplicate docstring
    (root / "pkg" / "latin1.py").write_bytes(b'"""Caf\xe9 is the name of the default shop."""\n')
    (root / "pkg" / "py2.py").write_text('print "this is the end of the file and it is ok"\n')
    (root / "pkg" / "code.py").write_text('"""x = f(a, b) [1, 2] {3: 4} >>> g()"""\n')
    os.symlink(root / "missing.py", root / "pkg" / "dangling.py")


def test_corpus_skips_bad_files_with_counts_and_dedupes(tmp_path):
    _write_sources(tmp_path / "src")
    built = corpus.build_corpus(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "c"))
    stats = built.stats
    assert (stats["not_utf8"], stats["unparsable"], stats["unreadable"]) == (1, 1, 1)
    lines = []
    for path in [built.validation_file, *built.train_files]:
        with open(path) as f:
            lines += f.read().splitlines()
    # The shared docstring (its two paragraphs on one line) once, plus the class docstring.
    assert len(lines) == 2 and len(set(lines)) == 2
    assert any(line.startswith("Return the number of items") for line in lines)
    assert not any(">>>" in line for line in lines)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="embedded corpus is empty"):
        corpus.build_corpus(roots=[str(tmp_path / "src")], cache_dir=str(tmp_path / "c"))


def test_corpus_and_vocab_build_deterministically(tmp_path):
    first, model_a = data_fixtures.build_tiny(str(tmp_path / "a"))
    again = corpus.build_corpus(
        roots=data_fixtures.TINY_ROOTS, max_bytes=600_000, cache_dir=str(tmp_path / "a")
    )
    assert again.directory == first.directory  # served from the cache
    assert corpus.load_corpus(first.directory) == first
    with pytest.raises(DataError, match="not a built corpus"):
        corpus.load_corpus(str(tmp_path))
    # Serial and 2-process extraction give the same bytes.
    second = corpus.build_corpus(
        roots=data_fixtures.TINY_ROOTS, max_bytes=600_000, cache_dir=str(tmp_path / "b"), workers=1
    )
    assert second.content_hash == first.content_hash
    assert first.stats["documents"]["validation"] > 0
    model_b = corpus.build_vocab(second, vocab_size=data_fixtures.TINY_VOCAB_SIZE)
    with open(model_a, "rb") as fa, open(model_b, "rb") as fb:
        assert fa.read() == fb.read()


def test_embedded_vocab_has_t5_ids_and_top_sentinels(tmp_path):
    _, model = data_fixtures.build_tiny(str(tmp_path))
    assert vocab.has_sentinels_inside(model)
    v = vocab.load_vocabulary(model)
    size = data_fixtures.TINY_VOCAB_SIZE
    assert v.vocab_size == size and v.extra_ids == 0
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    sp = v.tokenizer
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<pad>", "</s>", "<unk>"]
    for i in range(100):
        assert vocab.sentinel_id(v, i) == size - 1 - i
        assert v.decode([size - 1 - i]) == f"<extra_id_{i}>"
    assert not any(sp.id_to_piece(i).startswith("<extra_id") for i in range(size - 100))
    ids = v.encode("Return the value <extra_id_3> of the item.")
    assert size - 4 in ids and v.decode(ids) == "Return the value <extra_id_3> of the item."


def test_vocab_extra_ids_follow_the_100extra_name():
    assert vocab.has_sentinels_inside(vocab.T5_VOCAB)
    assert vocab.has_sentinels_inside(vocab.MT5_VOCAB)
    assert vocab.has_sentinels_inside("/x/vocab_8192.100extra/sentencepiece.model")
    assert not vocab.has_sentinels_inside("/x/spm_32000.model")
    v = vocab.load_vocabulary("/x/spm_32000.model", check=False)
    assert v.extra_ids == 100


def test_unreachable_vocabulary_is_a_clear_error_quickly(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="unreachable"):
        vocab.load_vocabulary("gs://no-such-bucket-switch-jax/sentencepiece.model")
    with pytest.raises(DataError, match="unreachable"):
        vocab.load_vocabulary(str(tmp_path / "missing.model"))
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_default_embedded_corpus_is_the_stdlib_docstrings(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCH_JAX_CACHE", str(tmp_path))
    built, model = corpus.build_embedded()
    # Python 3.11's standard library alone gives ~1.6 MB of prose; installed packages never count.
    assert built.stats["bytes"] >= 1_000_000
    assert not any("-packages" in root for root in built.stats["roots"])
    assert vocab.load_vocabulary(model).vocab_size == corpus.DEFAULT_VOCAB_SIZE
