"""Input pipelines: seqio tasks, span corruption, vocabularies, the embedded corpus (uses TF)."""

from switch_jax.data.errors import DataError

__all__ = ["DataError"]
