"""T5 span corruption (noise density 0.15, mean span 3, sentinels from the vocabulary's end)."""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from switch_jax.data.errors import DataError

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# T5 concatenates this many documents before cutting them into raw segments.
CONCAT_BATCH = 128
# T5 first keeps one random chunk of at most this many tokens per document.
MAX_CHUNK_TOKENS = 65536


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """Noise tokens and noise spans for a raw segment of `length` tokens (T5's rounding)."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def corrupted_lengths(
    tokens_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, after corrupting `tokens_length` raw tokens."""
    num_noise, num_spans = _span_counts(tokens_length, noise_density, mean_noise_span_length)
    # One sentinel per span on each side, plus the EOS the feature pipeline appends.
    inputs_length = tokens_length - num_noise + num_spans + 1
    targets_length = num_noise + num_spans + 1
    return inputs_length, targets_length


def random_spans_helper(
    inputs_length: int = 512,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """Largest raw length whose corruption fits `inputs_length`: returns (raw, targets) lengths.

    With the T5 defaults, 512 inputs need 568 raw tokens and give 114 targets.
    """
    if inputs_length < 3:
        raise DataError(
            f"span corruption needs an inputs length of at least 3, got {inputs_length}"
        )
    raw = 2
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]


def _random_partition(total, num_parts, seed):
    """Split `total` items into `num_parts` non-empty runs, uniformly over all such splits."""
    # Choosing num_parts-1 distinct cut points among the total-1 gaps gives every composition the
    # same probability; a stateless shuffle of the gaps picks them deterministically from `seed`.
    gaps = tf.range(1, total)
    order = tf.argsort(tf.random.stateless_uniform([total - 1], seed=seed))
    cuts = tf.sort(tf.gather(gaps, order[: num_parts - 1]))
    bounds = tf.concat([[0], cuts, [total]], axis=0)
    return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(
    length,
    seeds,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
):
    """Boolean mask over `length` tokens: alternating clean/noise spans, starting with clean.

    The number of noise tokens is round(length * noise_density) (at least 1, at most length-1)
    and they form round(noise / mean_noise_span_length) spans, so the realised density and mean
    span length match the targets exactly up to rounding.

    Args:
      length: int32 scalar tensor (or int), the number of tokens.
      seeds: two stateless seeds (each a [2] int tensor), for the noise and the clean spans.
      noise_density: fraction of tokens to mask.
      mean_noise_span_length: average length of a masked span.
    """
    orig_length = tf.cast(length, tf.int32)
    # A single token cannot hold both a clean and a noise span; work on 2 and cut back.
    length = tf.maximum(orig_length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
    clean_lengths = _random_partition(length - num_noise, num_spans, seeds[1])
    # Interleave [clean_0, noise_0, clean_1, noise_1, ...] and paint each run with its flag.
    run_lengths = tf.reshape(tf.stack([clean_lengths, noise_lengths], axis=1), [-1])
    run_is_noise = tf.tile([False, True], [num_spans])
    mask = tf.repeat(run_is_noise, run_lengths)
    return mask[:orig_length]


def _spans_to_sentinels(tokens, mask, vocab_size):
    """Replace each run of masked tokens by one sentinel; sentinel i is vocab_size - 1 - i."""
    prev_masked = tf.concat([[False], mask[:-1]], axis=0)
    span_starts = tf.logical_and(mask, tf.logical_not(prev_masked))
    continuation = tf.logical_and(mask, prev_masked)
    sentinels = vocab_size - tf.cumsum(tf.cast(span_starts, tokens.dtype))
    tokens = tf.where(span_starts, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(continuation))


def corrupt(tokens, noise_mask, vocab_size: int):
    """(inputs, targets) for `tokens` and its noise mask, without EOS.

    inputs keep the clean tokens with one sentinel per noise span; targets hold, for each span,
    its sentinel followed by the masked tokens. Because the mask starts with a clean span and
    alternates, the clean span i and noise span i both get sentinel vocab_size - 1 - i.
    """
    inputs = _spans_to_sentinels(tokens, noise_mask, vocab_size)
    targets = _spans_to_sentinels(tokens, tf.logical_not(noise_mask), vocab_size)
    return inputs, targets


@seqio.map_over_dataset(num_seeds=1)
def select_random_chunk(x, seed, feature_key: str = "targets", max_length: int = MAX_CHUNK_TOKENS):
    """Keep one random aligned chunk of at most `max_length` tokens of each document."""
    tokens = x[feature_key]
    n = tf.size(tokens)
    num_chunks = (n + max_length - 1) // max_length
    chunk = tf.random.stateless_uniform([], seed, 0, tf.maximum(num_chunks, 1), dtype=tf.int32)
    return {feature_key: tokens[chunk * max_length : (chunk + 1) * max_length]}


def concat_and_split(
    dataset: tf.data.Dataset,
    segment_length: int,
    feature_key: str = "targets",
    concat_batch: int = CONCAT_BATCH,
) -> tf.data.Dataset:
    """Concatenate `concat_batch` documents at a time, then cut into `segment_length` pieces.

    The last piece of each concatenation may be shorter; nothing is dropped or padded.
    """
    if segment_length <= 0:
        raise DataError(f"segment length must be positive, got {segment_length}")
    dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
    dataset = dataset.map(lambda x: x[feature_key], num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.ragged_batch(concat_batch)

    def split(batch):
        flat = batch.flat_values
        n = tf.size(flat)
        full, rest = n // segment_length, n % segment_length
        lengths = tf.concat(
            [tf.fill([full], segment_length), tf.reshape(rest, [1])[: tf.minimum(rest, 1)]], 0
        )
        return tf.RaggedTensor.from_row_lengths(flat, lengths)

    dataset = dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return dataset.map(lambda t: {feature_key: t}, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=2)
def _denoise(x, seeds, vocab_size, noise_density, mean_noise_span_length):
    tokens = x["targets"]
    mask = random_spans_noise_mask(tf.size(tokens), seeds, noise_density, mean_noise_span_length)
    inputs, targets = corrupt(tokens, mask, vocab_size)
    return {"inputs": inputs, "targets": targets}


def _lengths_or_error(sequence_length: Mapping[str, int] | None, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = (sequence_length or {}).get(key)
        if value is None or value <= 0:
            raise DataError(
                f"sequence length for '{key}' must be a positive integer, got {value} "
                f"(set feature_lengths, e.g. {{'inputs': 512, 'targets': 114}})"
            )


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.data.Dataset:
    """seqio preprocessor: tokenized 'targets' documents -> span-corrupted 'inputs'/'targets'.

    Like T5: one random chunk per document, 128 documents concatenated, cut into raw segments
    sized by `random_spans_helper(sequence_length['inputs'])`, then each segment corrupted. EOS
    is appended afterwards by seqio (the features have add_eos=True).

    Args:
      dataset: examples with an int 'targets' token vector.
      sequence_length: must hold a positive 'inputs' length (and 'targets' when checking).
      output_features: seqio features; the sentinels count down from the 'targets' vocab size.
      noise_density: fraction of tokens to mask.
      mean_noise_span_length: average masked span length.
    """
    _lengths_or_error(sequence_length, ("inputs",))
    raw_length, _ = random_spans_helper(
        sequence_length["inputs"], noise_density, mean_noise_span_length
    )
    vocab_size = output_features["targets"].vocabulary.vocab_size
    dataset = select_random_chunk(dataset)
    dataset = concat_and_split(dataset, raw_length)
    # Segments of 1 token cannot be corrupted meaningfully (T5 keeps them; they are rare tails).
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 1)
    return _denoise(
        dataset,
        vocab_size=vocab_size,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )


def lm_chunks(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
    """seqio preprocessor for decoder-only LM: documents + EOS concatenated, cut to targets length.

    Every document ends in EOS so the model sees boundaries; rows are full except the tail of
    each concatenation, so packing has little left to fill.
    """
    _lengths_or_error(sequence_length, ("targets",))
    eos = output_features["targets"].vocabulary.eos_id
    dataset = dataset.map(
        lambda x: {"targets": tf.concat([x["targets"], [eos]], axis=0)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return concat_and_split(dataset, sequence_length["targets"])
