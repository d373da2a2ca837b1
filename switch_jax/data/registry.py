"""Which seqio tasks and mixtures this package registered, with which arguments.

seqio's registries are process-global and refuse a second `add` of a name, while the built-in
register functions (tasks.py, glue.py, docstrings.py) run on every lookup. Each records the
arguments it registered a name with (its key): the same key again costs nothing, a new key (another
data_dir, another vocabulary) replaces the old task. Nothing registers on import.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence

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


def near_names(name: str, known: Iterable[str]) -> str:
    """'did you mean A, B or C?' with the known names closest to a mistyped task name (the
    whole list is long and the intended name is usually a typo away)."""
    words = set(name.lower().split("_"))

    def score(candidate: str) -> tuple[int, float]:
        shared = len(words & set(candidate.lower().split("_")))
        return shared, difflib.SequenceMatcher(None, name.lower(), candidate.lower()).ratio()

    known = set(known)
    if "." not in name:  # a mixture's per-language tasks (mc4_span_corruption.de) crowd it out
        known = {k for k in known if "." not in k} or known
    ranked = sorted(known, key=score, reverse=True)
    near = [k for k in ranked if score(k)[0] or score(k)[1] >= 0.6][:3]
    if not near:
        return f"{len(ranked)} are registered, e.g. {', '.join(sorted(ranked)[:3])}."
    choices = f"{', '.join(near[:-1])} or {near[-1]}" if len(near) > 1 else near[0]
    return f"did you mean {choices}?"
