"""The persistent compilation cache of the commands that run steps.

A run that starts again (a resume after preemption, eval or infer of a stored run, the same
config in another MODEL_DIR) loads its compiled programs from disk instead of compiling them:
the demo's train step compiles in ~10 s and loads in ~3 s (docs/benchmarks.md §12).

    --compile_cache_dir=DIR   where (a local folder, or gs://... on Cloud TPU)
    --compile_cache_dir=''    off
    default                   $JAX_COMPILATION_CACHE_DIR, else $SWITCH_JAX_CACHE/jax
                              (~/.cache/switch_jax/jax)

JAX keys each entry by the program, its own version, the devices and XLA's flags, so any change
compiles afresh; it keeps programs that took at least a second to compile (the demo's train
step: ~1 MB). The folder is not bounded: JAX_COMPILATION_CACHE_MAX_SIZE=BYTES makes JAX drop
the least recently used entries above it (that needs the `filelock` package). A folder that
cannot be created is a one-line error. JAX writes an entry in place, so a process killed
mid-write leaves it truncated; JAX then compiles again at every start but never replaces it.
Here such an entry is removed when JAX reports it unreadable (one line on stderr), and the
program compiled again is stored in its place.
`switch-bench` and `switch-compile` do not turn it on (they measure or produce compilations);
where $JAX_COMPILATION_CACHE_DIR turns it on for them anyway, switch-bench labels a compile
time that was a load from it.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import threading
import warnings

from switch_jax.models.config import ConfigError

COMMANDS = ("train", "eval", "infer", "experts")
ENV = "JAX_COMPILATION_CACHE_DIR"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_hits = 0
_lock = threading.Lock()
_listening = False
_replacing = False
_directory: str | None = None  # the folder in use (enable's), for the unreadable-entry hook


def default_dir() -> str:
    from switch_jax.data.corpus import cache_root  # pure Python: no TensorFlow behind it

    return os.environ.get(ENV) or os.path.join(cache_root(), "jax")


def enable(directory: str | None) -> str | None:
    """The cache at `directory` (None: `default_dir()`; '': off); the folder used, or None."""
    import jax

    global _directory, _replacing
    directory = default_dir() if directory is None else directory
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        _directory = None
        return None
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"--compile_cache_dir={directory}: cannot create it ({e.strerror}); "
                "pass a writable folder, or --compile_cache_dir='' to compile every time"
            ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    _directory = directory
    watch()
    with _lock:
        replacing, _replacing = _replacing, True
    if not replacing:
        warnings.showwarning = _replacing_unreadable(warnings.showwarning)
    return directory


def hits() -> int:
    """Programs loaded from the cache so far in this process (counted once `watch()`ed)."""
    return _hits


def watch() -> None:
    """Count the programs JAX loads from a persistent cache, whoever turned it on (once per
    process; `enable` calls it, `switch-bench` too, to label a compile time that was a load)."""
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    import jax

    def on_event(event: str, **_) -> None:
        global _hits
        if event == _HIT_EVENT:
            with _lock:
                _hits += 1

    jax.monitoring.register_event_listener(on_event)


# JAX's warning when an entry does not load (jax/_src/compiler.py, _cache_read), with the
# error's type: a file cut short fails to decompress (zlib's `error`, zstandard's `ZstdError`);
# a runtime error means the entry cannot be loaded here (e.g. by a compile-only client for
# another topology), not that the file is bad.
_UNREADABLE = re.compile(r"Error reading persistent compilation cache entry for '([^']+)': (\w+)")
_NOT_THE_FILE = ("JaxRuntimeError", "XlaRuntimeError")


def _replacing_unreadable(shown):
    """`warnings.showwarning` that handles JAX's unreadable-entry warning: it removes that
    program's entries, so that the compilation that follows stores a good one (JAX keeps an
    existing file), and says so in one line. Other warnings go to `shown`."""

    def show(message, category, filename, lineno, file=None, line=None):
        found = _UNREADABLE.match(str(message))
        directory = _directory
        if found is None or found.group(2) in _NOT_THE_FILE or not directory or "://" in directory:
            return shown(message, category, filename, lineno, file, line)
        module = found.group(1)
        for path in glob.glob(os.path.join(glob.escape(directory), f"{module}-*")):
            try:
                os.remove(path)
            except OSError:
                pass  # removed by another process, or read-only: compiled each time, as before
        print(
            f"compile cache: an unreadable entry of {module} in {directory} was removed; "
            "compiling it again",
            file=sys.stderr,
            flush=True,
        )

    return show
