"""gin for switch_jax: T5X-style flags, search paths, and typed config dataclasses out of gin.

Entry points do not use it directly: switch_jax.cli (the one entry module) defines the flags
with `define_flags`, rewrites `--gin.*` with `flags_parser` and parses with `parse_gin`.

Parsing order: `configs/defaults.gin` (every standard macro with its default), then each
--gin_file in order, then each binding. `--gin.NAME=VALUE` becomes the binding `NAME = VALUE`
(absl cannot define `--gin.*` flags). A bare VALUE that is not a gin literal but looks like a
path or a name (`--gin.MODEL_DIR=/tmp/run`) is taken as a string, so shell quoting is optional.
A binding of a macro that no file defines is an error (a typo would otherwise be ignored).

gin binds the config dataclasses: `ModelConfig`, `MoeConfig`, `OptimizerConfig`,
`TrainConfig`, `DataConfig`, `CheckpointConfig`. Each is a factory with the dataclass's
signature that checks value types against the annotations and turns dicts/lists into the tuples
the frozen dataclasses want (`TASK_FEATURE_LENGTHS` may be T5X's
`{'inputs': 512, 'targets': 114}`), then builds the real dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import gin
import gin.config

from switch_jax.config import gin_checks
from switch_jax.config.settings import (
    CheckpointConfig,
    Configs,
    DataConfig,
    DecodeConfig,
    DistillConfig,
    OptimizerConfig,
    TrainConfig,
)
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig

T = TypeVar("T")
CONFIG_CLASSES = (
    ModelConfig,
    MoeConfig,
    OptimizerConfig,
    TrainConfig,
    DataConfig,
    CheckpointConfig,
    DistillConfig,
    DecodeConfig,
)
DEFAULTS_FILE = "defaults.gin"


def _configs_folder() -> Path:
    """The gin configs: `configs/` at the top of a checkout (one copy in git), which the wheel
    ships as `switch_jax/configs/` (pyproject.toml maps it), so both layouts are looked for."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / DEFAULTS_FILE).is_file():
            return folder
    return package / "configs"  # not found: the error names where it should be


CONFIGS = _configs_folder()
_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=(.*)$", re.S)
BARE_STRING = re.compile(r"^[\w./:~+\-]+$")


# --------------------------------------------------------------------------- registration
def _factory(cls: type) -> Callable[..., Any]:
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]

    def make(**kwargs):
        for name, value in kwargs.items():
            kwargs[name] = _coerce(f"{cls.__name__}.{name}", value, hints[name], cls.__name__)
        return cls(**kwargs)

    make.__signature__ = inspect.signature(cls)  # gin validates binding names against this
    make.__name__ = make.__qualname__ = cls.__name__
    make.__doc__ = cls.__doc__
    make.__wrapped_dataclass__ = cls
    assert fields  # every config class is a dataclass
    return make


_FACTORIES = {}
for _cls in CONFIG_CLASSES:
    # Registered once per process; the module may be reloaded by tools, gin would then raise.
    if gin.config._REGISTRY.get_match(_cls.__name__) is None:  # noqa: SLF001
        _FACTORIES[_cls] = gin.external_configurable(_factory(_cls), name=_cls.__name__)
    else:
        _FACTORIES[_cls] = gin.get_configurable(_cls.__name__)


def _coerce(where: str, value: Any, hint: Any, owner: str) -> Any:
    """Return `value` converted to `hint` (containers to tuples, int to float) or raise."""
    ok, converted = _convert(value, hint)
    if not ok:
        macro = _macro_of(owner, where.split(".", 1)[1])
        via = f" (set by gin macro {macro})" if macro else ""
        raise ConfigError(f"{where}={value!r}{via} must be {_type_name(hint)}")
    return converted


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _convert(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in args, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        return _convert_tuple(value, args)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint), value
    return isinstance(value, hint), value


def _convert_tuple(value: Any, args: tuple) -> tuple[bool, Any]:
    if isinstance(value, dict):  # T5X writes TASK_FEATURE_LENGTHS as a dict
        value = tuple(value.items())
    if not isinstance(value, (tuple, list)):
        return False, value
    item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is ... else list(args)
    if len(item_hints) != len(value):
        return False, value
    out = []
    for item, item_hint in zip(value, item_hints, strict=True):
        ok, converted = _convert(item, item_hint)
        if not ok:
            return False, value
        out.append(converted)
    return True, tuple(out)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    text = str(hint).replace("typing.", "").replace("switch_jax.models.config.", "")
    return "a " + text if text.startswith("tuple") else text


def _macro_of(configurable: str, param: str) -> str | None:
    """Name of the macro a binding refers to (`TrainConfig.mesh_shape = %MESH_SHAPE`)."""
    try:
        raw = gin.get_bindings(configurable, resolve_references=False).get(param)
    except (ValueError, KeyError):
        return None
    if isinstance(raw, gin.config.ConfigurableReference) and raw.selector == "gin.macro":
        return raw.scoped_selector.split("/")[0]
    return None


# --------------------------------------------------------------------------- search paths
def default_search_paths() -> list[str]:
    """The shipped configs folder, then the current directory."""
    return [str(CONFIGS), os.getcwd()]


def _set_search_paths(paths: Sequence[str]) -> None:
    # gin keeps one global list and tries every prefix in order with two readers, the second of
    # which logs an error per miss: put ours first so shipped includes resolve without noise.
    prefixes = gin.config._LOCATION_PREFIXES  # noqa: SLF001
    prefixes[:] = [*dict.fromkeys([*paths, *prefixes])]


def _find_file(name: str, paths: Sequence[str]) -> str:
    candidates = [name] if os.path.isabs(name) else [os.path.join(p, name) for p in paths]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    near = gin_checks.closest(name, _gin_files(paths))
    if near:
        raise ConfigError(
            f"gin file {name!r} not found in the search paths; did you mean {near!r}?"
        )
    raise ConfigError(
        f"gin file {name!r} not found in the search paths {list(paths)}; pass a path relative "
        "to one of them or add its folder with --gin_search_paths"
    )


def _gin_files(paths: Sequence[str]) -> list[str]:
    """The .gin files under `paths`, relative to their search path (two folders deep: the
    search paths may include the current directory, which need not be small)."""
    found = []
    for root in paths:
        for pattern in ("*.gin", "*/*.gin", "*/*/*.gin"):
            found += [os.path.relpath(p, root) for p in Path(root).glob(pattern)]
    return sorted(set(found))


# --------------------------------------------------------------------------- parsing
def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    *,
    finalize: bool = True,
) -> None:
    """Clear gin, then parse defaults.gin, `gin_files` and `gin_bindings` (`NAME=VALUE` strings).

    Files are looked up in `search_paths`, then configs/, then the current directory.

    Raises:
      ConfigError: one line naming what to change, for any unknown file / name / syntax error.
    """
    paths = [*search_paths, *default_search_paths()]
    _set_search_paths(paths)
    with gin.unlock_config():
        gin.clear_config()
    gin.config._set_config_is_locked(False)  # noqa: SLF001  (tests and tools parse repeatedly)
    defaults = _find_file(DEFAULTS_FILE, paths)
    files = [defaults, *(_find_file(f, paths) for f in gin_files)]
    uses = gin_checks.MacroUses()
    for path in files:
        _guard(lambda p=path: gin.parse_config_file(p), f"gin file {path}")
        with open(path) as f:
            gin_checks.scan(f.read(), f"gin file {path}", uses, include_paths=paths)
        if path == defaults:
            uses.standard = set(uses.defined)
    for binding in gin_bindings:
        binding = _normalise_binding(binding)
        _guard(lambda b=binding: gin.parse_config(b), f"gin binding {binding!r}")
        gin_checks.scan(binding, f"gin binding {binding!r}", uses)
    gin_checks.check(uses)  # TRAIN_STEP = 5 in a file would otherwise train the default steps
    if finalize:
        gin.finalize()


def _normalise_binding(binding: str) -> str:
    name, sep, value = binding.partition("=")
    if not sep:
        raise ConfigError(f"gin binding {binding!r} must look like NAME=VALUE")
    name, value = name.strip(), value.strip()
    if "." not in name and "/" not in name:
        try:
            gin.query_parameter(f"%{name}")
        except ValueError:
            hint = gin_checks.did_you_mean(name, _macro_names(), "--gin.")
            raise ConfigError(
                f"unknown gin macro {name!r} in --gin.{name}"
                + (hint or " (standard macros are in configs/defaults.gin)")
            ) from None
    if value and not value.startswith(("@", "%")) and BARE_STRING.match(value):
        try:
            gin.config.parse_value(value)
        except (SyntaxError, ValueError, tokenize.TokenError):
            value = repr(value)  # /tmp/run, gs://b/x, c4_v301_span_corruption -> strings
    return f"{name} = {value}"


def _macro_names() -> list[str]:
    config = gin.config._CONFIG  # noqa: SLF001  (gin has no public "list macros")
    return [key[0].split("/")[0] for key in config if key[1] == "gin.macro"]


def _guard(fn: Callable[[], Any], where: str) -> None:
    try:
        fn()
    except ConfigError:
        raise
    except SyntaxError as e:
        line = (e.text or "").strip()
        raise ConfigError(
            f"gin syntax error in {where}, line {e.lineno}: {e.msg.split(' (line')[0]}"
            + (f": {line}" if line else "")
        ) from None
    except tokenize.TokenError as e:
        raise ConfigError(f"gin syntax error in {where}: {e.args[0]} (unclosed bracket?)") from None
    except OSError as e:
        raise ConfigError(f"{where}: {_first_line(e).rstrip('.')}; fix the include path") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        line = re.search(r'In file "[^"]*", line (\d+)', str(e))
        where += f", line {line.group(1)}" if line else ""
        raise ConfigError(f"{where}: {gin_checks.explain(_first_line(e))}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# --------------------------------------------------------------------------- configs
def configured(cls: type[T]) -> T:
    """An instance of `cls` (one of CONFIG_CLASSES) built from the parsed gin config."""
    if cls not in _FACTORIES:
        raise ConfigError(f"{cls.__name__} is not gin-configurable; use one of {CONFIG_CLASSES}")
    try:
        return _FACTORIES[cls]()
    except ConfigError as e:
        raise ConfigError(_first_line(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {_first_line(e)}") from None


def load_configs() -> Configs:
    """Every config dataclass of the parsed gin config."""
    distill = configured(DistillConfig)
    model = configured(ModelConfig)
    if distill.enabled and distill.student == "dense_twin":
        model = model.replace(moe=None)  # the student of runs/distill.gin (and of its eval)
    data = configured(DataConfig)
    _check_lengths(model, data)
    return Configs(
        model=model,
        train=configured(TrainConfig),
        data=data,
        checkpoint=configured(CheckpointConfig),
        optimizer=configured(OptimizerConfig),
        distill=distill if distill.enabled else None,
        decode=configured(DecodeConfig),
    )


def _check_lengths(model: ModelConfig, data: DataConfig) -> None:
    # The pipeline would find this only once data is read, after MODEL_DIR is written.
    needed = ("inputs", "targets") if model.is_encoder_decoder else ("targets",)
    missing = [key for key in needed if key not in data.feature_lengths]
    if missing:
        raise ConfigError(
            f"TASK_FEATURE_LENGTHS={data.feature_lengths} has no {missing[0]!r}, which the "
            f"{model.architecture} model needs, e.g. {{'inputs': 512, 'targets': 114}}"
        )


def operative_config() -> str:
    """gin text of everything used so far; parse_gin([that file]) rebuilds the same configs."""
    return gin.operative_config_str()


# --------------------------------------------------------------------------- absl flags
def define_flags() -> None:
    """--gin_file (repeatable), --gin_bindings (repeatable), --gin_search_paths (comma list)."""
    from absl import flags

    if "gin_file" in flags.FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "gin file, relative to a search path; repeatable")
    flags.DEFINE_multi_string(
        "gin_bindings", [], "gin binding NAME=VALUE; usually written --gin.NAME=VALUE"
    )
    flags.DEFINE_list(
        "gin_search_paths",
        [],
        "extra folders to look for gin files in (before configs/)",
    )


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """T5X's trick: `--gin.NAME=VALUE` -> `--gin_bindings=NAME=VALUE`."""
    out = []
    for arg in argv:
        if arg.startswith("--gin."):
            if "=" not in arg:
                raise ConfigError(f"{arg} needs a value: --gin.NAME=VALUE")
            arg = "--gin_bindings=" + arg[len("--gin.") :]
        out.append(arg)
    return out


def flags_parser(argv: list[str], owners: Callable[[str], str] | None = None) -> list[str]:
    """absl `flags_parser` for app.run: rewrites --gin.* then parses the flags.

    A bad flag is a ConfigError naming it, never absl's "Pass --helpshort or --helpfull" as the
    last line. `owners(name)` may say which other commands define an unknown flag.
    """
    from absl import flags

    try:
        return flags.FLAGS(rewrite_gin_args(argv))
    except flags.UnrecognizedFlagError as e:
        name = e.flagname or str(e).split("'")[1]
        hint = owners(name) if owners else ""
        if not hint:
            hint = gin_checks.did_you_mean(name, list(flags.FLAGS), "--") or " (see --helpshort)"
        raise ConfigError(f"unknown flag --{name}{hint}") from None
    except flags.Error as e:
        text = " ".join(str(e).split())
        raise ConfigError(text if text.startswith("flag --") else f"flags: {text}") from None
