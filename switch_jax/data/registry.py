"""Which seqio tasks and mixtures this package registered, with which arguments.

seqio's registries are process-global and refuse a second `add` of a name, while the built-in
register functions (tasks.py, glue.py, docstrings.py) run on every lookup. Each records the
arguments it registered a name with (its key): the same key again costs nothing, a new key (another
data_dir, another vocabulary) replaces the old task. Nothing registers on import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import seqio

_KEYS: dict[str, tuple | str | int] = {}


def key_of(name: str) -> tuple | str | int | None:
    """The arguments `name` was last registered with here; None if never."""
    return _KEYS.get(name)


def is_current(name: str, key, registry: type[seqio.DatasetProviderRegistry]) -> bool:
    """True when `registry` (seqio.TaskRegistry or MixtureRegistry) holds `name` from `key`.

    Both halves matter: a test may have removed the name from seqio behind our back.
    """
    return _KEYS.get(name) == key and name in registry.names()


def add_task(name: str, key, **task_args) -> str:
    """Register the task `name` (replacing any earlier one) and remember `key`."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **task_args)
    _KEYS[name] = key
    return name


def add_mixture(name: str, key, task_names: Sequence[str], **mixture_args) -> str:
    """Register the mixture `name` over registered tasks (replacing any earlier one)."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, task_names, **mixture_args)
    _KEYS[name] = key
    return name


def forget(name: str) -> None:
    """Drop the task `name` from seqio and from the record (tests that register a stand-in)."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    _KEYS.pop(name, None)


def vocab_key(vocabulary: str | seqio.Vocabulary) -> str | int:
    """A hashable stand-in for a vocabulary argument: its path, or the object's identity."""
    return vocabulary if isinstance(vocabulary, str) else id(vocabulary)


def tfds_dir(tfds_data_dir: str | None) -> str:
    """The TFDS data directory a task reads: the argument, $TFDS_DATA_DIR, or TFDS's default."""
    return (
        tfds_data_dir
        or os.environ.get("TFDS_DATA_DIR")
        or os.path.expanduser("~/tensorflow_datasets")
    )
