"""SentencePiece vocabularies: T5's (C4), mT5's (mC4) or a local file, checked before use."""

from __future__ import annotations

import os

import seqio

from switch_jax.data.errors import DataError, path_exists

# The public vocabularies the released T5 / Switch checkpoints were trained with: a model that
# loads their weights must tokenize with the same file, id for id.
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
MT5_VOCAB = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
NUM_SENTINELS = 100  # <extra_id_0> ... <extra_id_99>, what T5's span corruption can use


def has_sentinels_inside(path: str) -> bool:
    """True when the model file already holds the 100 sentinels (T5's `*.100extra` naming)."""
    # The suffix may sit on the file or on its folder (cc_all.32000.100extra/sentencepiece.model).
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    stems = [p[: -len(".model")] if p.endswith(".model") else p for p in parts]
    return any(s.endswith("100extra") for s in stems)


def load_vocabulary(
    path_or_vocab: str | seqio.Vocabulary,
    extra_ids: int | None = None,
    check: bool = True,
) -> seqio.Vocabulary:
    """A seqio vocabulary from a SentencePiece model path (local or gs://), checked up front.

    Args:
      path_or_vocab: a model path, or a ready seqio.Vocabulary (returned as is).
      extra_ids: sentinels seqio adds on top of the file; default 0 for `*100extra` models (T5
        and mT5 ship the sentinels inside) and 100 otherwise.
      check: verify the file is reachable now; seqio loads lazily and would otherwise fail deep
        inside the first `get_dataset`.
    """
    if isinstance(path_or_vocab, seqio.Vocabulary):
        return path_or_vocab
    path = os.fspath(path_or_vocab)
    if check and not path_exists(path):
        raise DataError(
            f"vocabulary {path} is unreachable; pass a local SentencePiece model as the task's "
            "vocabulary (or use the embedded_* tasks, which build their own)"
        )
    if extra_ids is None:
        # Adding 100 to a *.100extra model would shift every sentinel id away from the ones the
        # released checkpoints were trained with (and leave 100 ids no text ever uses).
        extra_ids = 0 if has_sentinels_inside(path) else NUM_SENTINELS
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def sentinel_id(vocab: seqio.Vocabulary, i: int) -> int:
    """Id of <extra_id_i>: sentinels count down from the last id of the vocabulary.

    T5's convention, whether the sentinels are in the file or added by seqio: <extra_id_0> is
    always the last id, so span corruption needs no lookup by piece name.
    """
    return vocab.vocab_size - 1 - i
