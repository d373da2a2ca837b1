"""Strict gin: misspelt macros and names in gin files or flags are errors with a suggestion.

gin itself accepts `TRAIN_STEP = 5` in a file (it defines a new macro nobody reads, so the run
silently uses the default) and names unknown configurables without saying what was meant. These
checks run after gin has parsed everything:

- a macro set in a gin file that is not a standard macro (defaults.gin) and that no binding
  refers to is an error naming the file and line and the closest known macro;
- a `%MACRO` that nothing defines is an error naming where it is used;
- gin's "no configurable" / "no parameter" errors get the closest known name added.

Standard macros a config does not use (EXPERT_DROPOUT_RATE with a dense model) stay accepted:
run files such as finetune.gin set them for any model.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from collections.abc import Iterable, Sequence

import gin.config
from gin import config_parser

from switch_jax.models.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a macro is set or read: 'gin file F, line N' or 'gin binding ...'."""

    where: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.where}, line {self.line}" if self.line else self.where


@dataclasses.dataclass
class MacroUses:
    """Macros set and read by the parsed files and bindings, with where."""

    defined: dict[str, Site] = dataclasses.field(default_factory=dict)  # last definition wins
    referenced: dict[str, Site] = dataclasses.field(default_factory=dict)  # first use
    standard: set[str] = dataclasses.field(default_factory=set)  # set in defaults.gin


class _Macro:
    def __init__(self, name: str):
        self.name = name.split("/")[-1]


class _Delegate(config_parser.ParserDelegate):
    """Builds plain markers instead of gin references: scanning needs no registry."""

    def configurable_reference(self, scoped_name, evaluate):
        return None

    def macro(self, scoped_name):
        return _Macro(scoped_name)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The most similar candidate (difflib, case-insensitive), or None if nothing is close."""
    by_key = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(name.lower(), list(by_key), n=1, cutoff=0.6)
    return by_key[match[0]] if match else None


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """'; did you mean {prefix}{closest}?' to append to an error, or '' when nothing is close."""
    best = closest(name, candidates)
    return f"; did you mean {prefix}{best}?" if best else ""


def scan(text: str, where: str, uses: MacroUses, *, include_paths: Sequence[str] = ()) -> None:
    """Record the macros `text` (a gin file or a binding) sets and reads, includes too."""
    is_file = where.startswith("gin file")
    for statement in config_parser.ConfigParser(text, _Delegate()):
        line = statement.location.line_num if is_file else None
        if isinstance(statement, config_parser.IncludeStatement):
            path = _resolve(statement.filename, include_paths)
            if path is not None:  # a missing include is gin's error to report
                with open(path) as f:
                    scan(f.read(), f"gin file {path}", uses, include_paths=include_paths)
            continue
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        if not statement.arg_name:  # `NAME = value` sets a macro
            uses.defined[statement.selector.split("/")[-1]] = Site(where, line)
        for name in _macros_in(statement.value):
            uses.referenced.setdefault(name, Site(where, line))


def check(uses: MacroUses) -> None:
    """Raise ConfigError for a macro set but never read, or read but never set."""
    known = set(uses.defined) | set(uses.referenced) | uses.standard
    for name, site in uses.defined.items():
        if name in uses.standard or name in uses.referenced:
            continue
        hint = did_you_mean(name, known - {name}) or (
            " (standard macros are listed in configs/defaults.gin)"
        )
        raise ConfigError(f"{site}: macro {name} is set but nothing uses it{hint}")
    for name, site in uses.referenced.items():
        if name not in uses.defined:
            hint = did_you_mean(name, set(uses.defined), "%")
            raise ConfigError(f"{site}: macro %{name} is not defined anywhere{hint}")


def explain(message: str) -> str:
    """gin's one-line error about an unknown name, with the closest known name added."""
    match = re.search(r"No configurable matching '([^']+)'", message)
    if match:
        return message.rstrip(".") + did_you_mean(match.group(1), configurable_names())
    match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if match:
        params = parameter_names(match.group(1))
        return message.rstrip(".") + did_you_mean(match.group(2), params)
    return message


def configurable_names() -> list[str]:
    """Short names of every gin configurable registered in this process, sorted."""
    registry = gin.config._REGISTRY  # noqa: SLF001  (gin has no public "list configurables")
    return sorted({selector.split(".")[-1] for selector, _ in registry.items()})


def parameter_names(configurable: str) -> list[str]:
    """Parameters of a gin configurable by name; [] if gin does not know it (no suggestion)."""
    try:
        fn = gin.config._REGISTRY.get_match(configurable).wrapped  # noqa: SLF001
        return list(inspect.signature(fn).parameters)
    except (AttributeError, TypeError, ValueError):
        return []


def _macros_in(value) -> Iterable[str]:
    if isinstance(value, _Macro):
        yield value.name
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _macros_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _macros_in(key)
            yield from _macros_in(item)


def _resolve(name: str, paths: Sequence[str]) -> str | None:
    candidates = [name] if os.path.isabs(name) else [os.path.join(p, name) for p in paths]
    return next((c for c in candidates if os.path.isfile(c)), None)
