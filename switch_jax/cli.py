"""The one entry module: absl flags + gin, host set-up, and user errors as one line.

Every entry point (train, eval, infer, info, bench, compile, convert, plot) is written as::

    from absl import flags
    from switch_jax import cli

    _OUT = cli.define_flag(flags.DEFINE_string, "output_file", None, "...")  # its own flags

    def main(argv):                     # absl argv, gin already parsed (see `entry`)
        configs = cli.configs()         # config.settings.Configs from the parsed gin
        ...

    console_main = cli.entry(main)      # the console script (pyproject [project.scripts])
    if __name__ == "__main__":
        console_main()

`entry(main)` returns a function that parses the flags (`--gin.NAME=VALUE` rewritten into gin
bindings, T5X's spelling), joins the hosts (`join_hosts`, before anything touches a device),
parses gin (defaults.gin, each --gin_file, each binding; `entry(main, gin=False)` leaves that to
`main`, e.g. to read a MODEL_DIR's config.gin first), quiets library INFO logs unless
--verbosity was given, and calls `main(argv)`. A `ConfigError` ends the process with one line
and exit status 2; the other user errors (bad checkpoint, missing data, non-finite loss, a full
disk: `user_errors()` plus the entry's `extra_errors=`) with one line and status 1; Ctrl-C with
one line and status 130.

The entries that run steps (`host_malloc.COMMANDS`), started as their own process (console
script or `python -m`), restart once under TCMalloc where the library is installed
(`parallel.host_malloc`: a CPU train step took 9-37 % less time; SWITCH_JAX_MALLOC=system keeps
the system malloc). The package's import does it before jax loads; `entry` reports a bad
SWITCH_JAX_MALLOC it met as one line.

The commands that run steps keep their compiled programs in a persistent cache
(`parallel.compile_cache`, --compile_cache_dir), so a run started again loads them.

Host flags (T5X's names): --coordinator_address=HOST:PORT --process_count=N --process_index=I.
Without them the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables are
used, and on a TPU pod slice or under Slurm JAX finds the other hosts itself. On CPU with more
than one process the gloo collectives are enabled.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from switch_jax.config import gin_config
from switch_jax.config.settings import Configs
from switch_jax.models.config import ConfigError
from switch_jax.parallel import compile_cache, host_malloc, hosts
from switch_jax.report import console

gin_config.define_flags()
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (multi-host runs; T5X's flag)"
)
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", None, "number of processes (hosts)", lower_bound=1
)
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "this process's index", lower_bound=0)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s",
    300,
    "seconds to wait for the other processes to join",
    lower_bound=1,
)


_COMPILE_CACHE_DIR = flags.DEFINE_string(
    "compile_cache_dir",
    None,
    "persistent compilation cache: a run started again loads its compiled steps "
    "(default $JAX_COMPILATION_CACHE_DIR, else $SWITCH_JAX_CACHE/jax; '' turns it off)",
)

# The commands whose flags `define_flag` records, to say where an unknown flag belongs.
COMMANDS = ("train", "eval", "infer", "info", "compile", "convert", "bench", "experts")
_FLAG_OWNERS: dict[str, set[str]] = {"compile_cache_dir": set(compile_cache.COMMANDS)}


def define_flag(define: Callable[..., Any], name: str, *args: Any, **kwargs: Any):
    """`define(name, *args)` (a flags.DEFINE_*), or the flag already defined by that name.

    One process runs one entry point, but tests import several entry modules into one process:
    a second `--json` or `--output` must not be a DuplicateFlagError (the first help text wins).
    """
    _FLAG_OWNERS.setdefault(name, set()).add(_command_of(sys._getframe(1).f_globals))  # noqa: SLF001
    if name in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return define(name, *args, **kwargs)


def usage(command: str, doc: str | None) -> str:
    """What `switch-COMMAND --help` prints: the command's docstring, its own flags, gin's."""
    own = sorted(name for name, owners in _FLAG_OWNERS.items() if command in owners)
    lines = [(doc or f"switch-{command}").strip(), ""]
    if own:
        lines.append(f"Flags of switch-{command}:")
    for name in own:
        if name in flags.FLAGS:
            flag = flags.FLAGS[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines.append(f"  --{name}: {flag.help}{default}")
    if command in COMMANDS:  # every absl command reads gin (plot has argparse's help)
        lines += [
            "Gin (every run command):",
            "  --gin_file=F      a gin file, repeatable; found in the working directory or the",
            "                    package's configs/ (models/*.gin, runs/*.gin; docs/configs.md)",
            "  --gin.NAME=VALUE  a macro or binding, e.g. --gin.TRAIN_STEPS=1000,",
            "                    --gin.MODEL_DIR=\"'runs/x'\", --gin.MoeConfig.top_k=2",
            "  --gin_search_paths  more folders to find gin files in",
            "Multi-host: --coordinator_address=HOST:PORT --process_count=N --process_index=I",
            "  (or the cluster's environment: Cloud TPU, SLURM; docs/tpu.md)",
        ]
    lines += ["--verbosity=N (any N) shows the library logs hidden by default; --helpfull: all."]
    return "\n".join(lines).replace("%", "%%") + "\n"  # absl substitutes %s in usage text


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one line, no traceback."""
    from switch_jax.store.checkpoints import CheckpointError
    from switch_jax.store.lease import LeaseError
    from switch_jax.training.trainer import NonFiniteLossError

    # OSError: a full disk or a vanished mount mid-run is the operator's to fix, not a bug.
    errors: list[type[BaseException]] = [CheckpointError, NonFiniteLossError, LeaseError, OSError]
    try:
        from switch_jax.data import DataError

        errors.append(DataError)
    except ImportError:  # the data extra is not installed; ConfigError still covers the rest
        pass
    return tuple(errors)


def join_hosts(*, log_devices: bool = True) -> bool:
    """jax.distributed.initialize from the host flags / environment / cluster; True if joined.

    Logs the process index and count and the local / global devices once (process 0 prints).
    """
    joined = hosts.initialize(
        _COORDINATOR.value,
        _PROCESS_COUNT.value,
        _PROCESS_INDEX.value,
        timeout_s=_INIT_TIMEOUT.value,
    )
    if log_devices or joined:
        import jax

        devices = jax.devices()
        line = (
            f"process {jax.process_index()}/{jax.process_count()}: "
            f"{jax.local_device_count()} local / {len(devices)} global "
            f"{devices[0].platform} devices ({devices[0].device_kind})"
        )
        logging.info(line)
        if jax.process_index() == 0 and joined:
            print(line, flush=True)
    return joined


def quiet_library_logs() -> None:
    """Orbax and TensorFlow log every save at INFO; keep the console to our own lines unless
    the user asked for more with --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        console.quiet_known_noise()  # TF/CUDA C++ start-up lines, Orbax's metadata warning


def configs() -> Configs:
    """The configs of the gin parsed by `entry` (or by `parse_gin` in the entry's main)."""
    return gin_config.load_configs()


def parse_gin(extra_files: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Parse `extra_files` (e.g. a MODEL_DIR's config.gin), then --gin_file and bindings."""
    f = flags.FLAGS
    gin_config.parse_gin(
        [*extra_files, *f.gin_file], f.gin_bindings, f.gin_search_paths, finalize=finalize
    )


def stored_run_configs(step: str) -> Configs:
    """The configs of an existing run (eval, infer): MODEL_DIR and `step` checked first, then
    its stored config.gin under the command line's --gin_file and bindings."""
    from switch_jax.store import model_dir as model_dir_lib
    from switch_jax.store import stored_config

    bindings = flags.FLAGS.gin_bindings
    given = stored_config.model_dir_of(bindings)
    if given:  # before gin: a mistyped MODEL_DIR is the error, not the gin it lacks
        model_dir_lib.require_run(given, step)
    parse_gin(stored_config.stored_config_files(bindings))
    run_configs = configs()
    model_dir_lib.require_run(run_configs.checkpoint.model_dir, step)
    return run_configs


def check_task(configs: Configs) -> None:
    """Look the task up (registering a built-in one) before a MODEL_DIR is created or a model
    built: a misspelt name is refused before the run's header is printed."""
    from switch_jax.data import tasks
    from switch_jax.decode import evaluation

    data = configs.data
    tasks.get_provider(data.mixture_or_task_name, **evaluation.data_options(data))


def operative_config() -> str:
    """The gin bindings in effect (what the trainer stores as MODEL_DIR/config.gin)."""
    return gin_config.operative_config()


def _command_of(module_globals: dict) -> str:
    """'info' for switch_jax.info, also when it runs as `python -m` (then named __main__)."""
    spec = module_globals.get("__spec__")
    name = spec.name if spec is not None else module_globals.get("__name__", "")
    return name.rsplit(".", 1)[-1]


def flag_owners(command: str) -> Callable[[str], str]:
    """For `command`'s flags parser: '; it is a flag of switch-X' for a flag another command
    defines, or ''. The other entry modules are imported only then, to learn their flags."""

    def owners(name: str) -> str:
        import importlib

        for other in COMMANDS:
            if other != command:
                importlib.import_module(f"switch_jax.{other}")
        found = sorted(_FLAG_OWNERS.get(name.removeprefix("no"), set()) - {command})
        if not found:
            return ""
        where = " and ".join(f"switch-{c}" for c in found)
        return f": it is a flag of {where}, not of switch-{command}"

    return owners


def fail(error: BaseException, status: int) -> None:
    """Print `error` as one line on stderr and exit with `status`."""
    text = " ".join(str(error).split()) or type(error).__name__
    name = type(error).__name__
    print(text if text.startswith(name) else f"{name}: {text}", file=sys.stderr, flush=True)
    # The error is told: reads Orbax left in flight (coroutines, clean-up threads) must not
    # print their tracebacks after it while the interpreter shuts down.
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None
    sys.exit(status)


def entry(
    main: Callable[[list[str]], Any],
    *,
    gin: bool = True,
    hosts: bool = True,
    extra_errors: Sequence[type[BaseException]] = (),
) -> Callable[[], None]:
    """The console-script function of an entry point (see the module docstring).

    Args:
      main: called with absl's remaining argv once flags, hosts and gin are set up.
      gin: parse the gin flags before `main` (False: `main` calls cli.parse_gin).
      hosts: join the hosts and log the devices (False for entries that use no device).
      extra_errors: more exception types to report as one line with status 1.
    """

    def guarded(argv: list[str]) -> Any:
        try:
            quiet_library_logs()
            if hosts:
                join_hosts()
            if command in compile_cache.COMMANDS:
                compile_cache.enable(_COMPILE_CACHE_DIR.value)
            if gin:
                parse_gin()
            return main(argv)
        except ConfigError as e:
            fail(e, 2)
        except KeyboardInterrupt:
            fail(KeyboardInterrupt("interrupted"), 130)
        except (*user_errors(), *extra_errors) as e:
            fail(e, 1)

    command = _command_of(main.__globals__)

    def parse_flags(argv: list[str]) -> list[str]:
        rest = gin_config.flags_parser(argv, flag_owners(command))
        # Where several entry modules share a process (tests, tools) another command's flag
        # parses: refuse it as a process running only this command would.
        for name, owners in _FLAG_OWNERS.items():
            if command not in owners and name in flags.FLAGS and flags.FLAGS[name].present:
                raise ConfigError(f"unknown flag --{name}{flag_owners(command)(name)}")
        return rest

    def console_main() -> None:
        try:
            host_malloc.raise_early_error()  # the package's import tried the restart
        except ConfigError as e:
            fail(e, 2)
        # absl's --help prints the __main__ module's docstring, which a console script lacks.
        sys.modules["__main__"].__doc__ = usage(command, main.__globals__.get("__doc__"))
        try:
            app.run(guarded, flags_parser=parse_flags)
        except ConfigError as e:  # a bad flag, or --gin.* without a value
            fail(e, 2)

    return console_main
