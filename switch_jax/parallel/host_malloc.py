"""The host's malloc: the commands that run steps restart once under TCMalloc where it is
installed.

XLA:CPU allocates and frees a step's buffers through the process's malloc, every step. Under
glibc's malloc a fresh 32 MiB output costs ~10 ms of page faults, against ~2.5 ms under
TCMalloc. The bfloat16 train step of the issue-24 config took 9-37 % less time under TCMalloc
(docs/benchmarks.md §9); tuning glibc with mallopt did not help there. TCMalloc can replace
malloc only before the process's first allocation, so the way in is LD_PRELOAD and one restart
of the command. PyTorch's CPU launcher (torch.backends.xeon.run_cpu) preloads it the same way.

    SWITCH_JAX_MALLOC=auto      (default) TCMalloc if a library is found, else the system's
    SWITCH_JAX_MALLOC=tcmalloc  TCMalloc or a one-line error
    SWITCH_JAX_MALLOC=system    never restart
    SWITCH_JAX_TCMALLOC=PATH    the library to preload (default: searched, `_LIBRARIES`)

Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping, Sequence

from switch_jax.models.config import ConfigError

# The commands that run steps (the others compile, convert or describe): switch-X, or
# `python -m switch_jax.X`.
COMMANDS = ("train", "eval", "infer", "bench", "experts")
CHOICE_ENV = "SWITCH_JAX_MALLOC"
LIBRARY_ENV = "SWITCH_JAX_TCMALLOC"
CHOICES = ("auto", "tcmalloc", "system")
# Set in the restarted process: it never restarts again, even where the preload failed.
RESTARTED_ENV = "SWITCH_JAX_MALLOC_RESTARTED"
# TCMalloc prints a stack trace for every allocation over 1 GiB by default; a training step's
# buffers are that large by design.
_REPORT_ENV = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
_NEVER_REPORT = str(1 << 62)

_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def started_command(argv: Sequence[str]) -> str | None:
    """X where the interpreter's command line `argv` (`sys.orig_argv`) runs switch-X or
    `python -m switch_jax.X`, else None (pytest, `python -c`, a notebook)."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            module = next(args, "")
            return module.removeprefix("switch_jax.") if module.startswith("switch_jax.") else None
        if arg == "-c":  # a program given inline
            return None
        if arg in ("-W", "-X"):  # an option with a value
            next(args, None)
        elif not arg.startswith("-"):
            name = os.path.basename(arg)
            return name.removeprefix("switch-") if name.startswith("switch-") else None
    return None


def loaded_tcmalloc(maps_path: str = "/proc/self/maps") -> str | None:
    """The TCMalloc library mapped into this process, or None (also where /proc is absent)."""
    try:
        with open(maps_path) as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "tcmalloc" in os.path.basename(path):
                    return path
    except OSError:
        return None
    return None


def find_tcmalloc(env: Mapping[str, str], dirs: Sequence[str] = _DIRS) -> str | None:
    """The TCMalloc library to preload: $SWITCH_JAX_TCMALLOC (which must exist), else the
    first of `_LIBRARIES` in `dirs`, else what the linker's search finds; None if none."""
    given = env.get(LIBRARY_ENV)
    if given:
        if not os.path.isfile(given):
            raise ConfigError(f"{LIBRARY_ENV}={given}: no such file")
        return given
    for directory in dirs:
        for name in _LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def restart_command(
    env: Mapping[str, str],
    argv: Sequence[str],
    executable: str,
    *,
    platform: str = sys.platform,
    loaded: str | None = None,
    dirs: Sequence[str] = _DIRS,
) -> tuple[list[str], dict[str, str]] | None:
    """(argv, environment) that run this command again under TCMalloc, or None to go on as is.

    `argv` is the interpreter's command line (`sys.orig_argv`: `python -m M ...` or
    `python bin/switch-X ...`); `loaded` the TCMalloc already mapped (`loaded_tcmalloc()`).
    """
    choice = env.get(CHOICE_ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{CHOICE_ENV}={choice}: choose from {', '.join(CHOICES)}")
    if choice == "system" or loaded or env.get(RESTARTED_ENV):
        return None
    library = find_tcmalloc(env, dirs) if platform.startswith("linux") else None
    if library is None or not argv:
        if choice == "tcmalloc":
            where = "this platform" if not platform.startswith("linux") else "this machine"
            raise ConfigError(
                f"{CHOICE_ENV}=tcmalloc: no TCMalloc library on {where}; install it (Debian/"
                f"Ubuntu: apt-get install libtcmalloc-minimal4), set {LIBRARY_ENV}=PATH, or "
                f"set {CHOICE_ENV}=system"
            )
        return None
    new_env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    new_env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    new_env.setdefault(_REPORT_ENV, _NEVER_REPORT)
    new_env[RESTARTED_ENV] = "1"
    return [executable, *argv[1:]], new_env


def restart_under_tcmalloc(commands: Sequence[str] | None = COMMANDS) -> None:
    """Replace this process by the same command line under TCMalloc (`restart_command`) where
    it was started as one of `commands` (None: whatever it runs, e.g. a benchmark script that
    must share the commands' malloc); returns only where it does not restart."""
    argv = getattr(sys, "orig_argv", [])
    if commands is not None and started_command(argv) not in commands:
        return
    command = restart_command(os.environ, argv, sys.executable, loaded=loaded_tcmalloc())
    if command is None:
        return
    argv, env = command
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


@functools.cache  # a process's malloc is fixed at its start
def describe() -> str:
    """What allocates this process's host memory, for benchmark reports."""
    library = loaded_tcmalloc()
    return f"tcmalloc ({library})" if library else "system malloc"


# A bad setting met by `restart_early`, kept for cli.entry to report as one line.
_early_error: ConfigError | None = None


def restart_early() -> None:
    """`restart_under_tcmalloc` from the package's import, before jax is."""
    global _early_error
    try:
        restart_under_tcmalloc()
    except ConfigError as e:
        _early_error = e


def raise_early_error() -> None:
    """Raise the bad setting `restart_early` met, if any (cli.entry, where user errors become
    one line)."""
    if _early_error is not None:
        raise _early_error
