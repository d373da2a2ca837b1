"""Span corruption against T5's semantics: lengths, statistics, sentinels, exact reconstruction."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from switch_jax.data import DataError  # noqa: E402
from switch_jax.data import span_corruption as sc  # noqa: E402

VOCAB = 1100  # sentinels 1099, 1098, ...; ordinary tokens stay below 1000


def _mask(length, seed):
    seeds = tf.constant([[seed, 1], [seed, 2]], tf.int32)
    return sc.random_spans_noise_mask(length, seeds).numpy()


def _runs(mask):
    """(is_noise, length) of each run of equal values."""
    edges = np.flatnonzero(np.diff(mask.astype(int))) + 1
    return [(bool(r[0]), len(r)) for r in np.split(mask, edges)]


def _reconstruct(inputs, targets, vocab=VOCAB, first_sentinel_id=1000):
    """Put each sentinel's target span back where the sentinel sits in the inputs."""
    spans, current = {}, None
    for t in targets:
        if t >= first_sentinel_id:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t >= first_sentinel_id else [t])
    return out


def test_random_spans_helper_gives_t5_lengths():
    assert sc.random_spans_helper(512) == (568, 114)
    assert sc.corrupted_lengths(568) == (512, 114)
    # One more raw token would no longer fit the 512 inputs.
    assert sc.corrupted_lengths(569)[0] > 512
    raw, targets = sc.random_spans_helper(64)
    assert sc.corrupted_lengths(raw) == (64, targets)


def test_noise_mask_density_and_mean_span_length():
    noise = spans = total = 0
    rng = np.random.default_rng(0)
    for i, length in enumerate(rng.integers(50, 1000, size=200)):
        mask = _mask(int(length), i)
        runs = _runs(mask)
        assert len(mask) == length
        assert runs[0][0] is False  # starts clean, then alternates
        assert [r[0] for r in runs] == [j % 2 == 1 for j in range(len(runs))]
        noise += mask.sum()
        spans += sum(r[0] for r in runs)
        total += length
    assert noise / total == pytest.approx(0.15, abs=0.002)
    assert noise / spans == pytest.approx(3.0, abs=0.1)


def test_noise_mask_is_deterministic_in_its_seeds():
    np.testing.assert_array_equal(_mask(568, 3), _mask(568, 3))
    assert not np.array_equal(_mask(568, 3), _mask(568, 4))
    assert _mask(568, 3).sum() == 85 and sum(r[0] for r in _runs(_mask(568, 3))) == 28
    assert _mask(1, 0).tolist() == [False]


def test_corrupt_reconstructs_and_orders_sentinels():
    rng = np.random.default_rng(1)
    for i in range(20):
        tokens = rng.integers(3, 1000, size=568).astype(np.int32)
        mask = _mask(568, i)
        inputs, targets = (t.numpy() for t in sc.corrupt(tf.constant(tokens), mask, VOCAB))
        assert (len(inputs) + 1, len(targets) + 1) == (512, 114)
        expected = list(range(VOCAB - 1, VOCAB - 29, -1))  # <extra_id_0>, <extra_id_1>, ...
        assert [t for t in inputs if t >= 1000] == expected
        assert [t for t in targets if t >= 1000] == expected
        assert targets[0] == VOCAB - 1
        assert _reconstruct(inputs, targets) == tokens.tolist()


def _features():
    vocab = seqio.PassThroughVocabulary(size=VOCAB, eos_id=1)
    return {"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)}


def test_preprocessor_reconstructs_the_document_stream():
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, 1000, size=n).astype(np.int32) for n in rng.integers(1, 400, 60)]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    with seqio.utils.map_seed_manager(5):
        out = sc.span_corruption(ds, {"inputs": 512, "targets": 114}, _features())
    examples = list(out.as_numpy_iterator())
    lengths = [(len(e["inputs"]), len(e["targets"])) for e in examples]
    # Every full raw segment of 568 tokens gives exactly 511 + EOS inputs and 113 + EOS targets.
    assert lengths[:-1] == [(511, 113)] * (len(lengths) - 1)
    rebuilt = sum((_reconstruct(e["inputs"], e["targets"]) for e in examples), [])
    assert rebuilt == np.concatenate(docs).tolist()


def test_preprocessor_is_deterministic_for_a_seed():
    ds = tf.data.Dataset.from_tensor_slices({"targets": np.arange(3, 3003).reshape(3, 1000)})

    def run(seed):
        with seqio.utils.map_seed_manager(seed):
            out = sc.span_corruption(ds, {"inputs": 128, "targets": 32}, _features())
        return [e["inputs"].tolist() for e in out.as_numpy_iterator()]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("lengths", [{"inputs": 0, "targets": 114}, {"targets": 114}])
def test_zero_or_missing_inputs_length_is_a_clear_error(lengths):
    ds = tf.data.Dataset.from_tensor_slices({"targets": [[5, 6, 7]]})
    with pytest.raises(DataError, match="sequence length for 'inputs'"):
        sc.span_corruption(ds, lengths, _features())
    with pytest.raises(DataError, match="sequence length for 'targets'"):
        sc.lm_chunks(ds, {"targets": 0}, _features())
