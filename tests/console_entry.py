"""Run a command's console entry in this process, as `switch-COMMAND ARGS` would run it."""

from __future__ import annotations

import importlib
import sys
import threading

from absl import flags


def invoke(command: str, args: list[str]) -> int:
    """The exit status of `switch-COMMAND ARGS` (flags, gin, hosts and cli's one-line errors);
    its output goes to this process's sys.stdout / sys.stderr."""
    module = importlib.import_module(f"switch_jax.{command}")
    hooks = sys.unraisablehook, threading.excepthook  # cli.fail silences them for the exit
    flags.FLAGS.unparse_flags()
    argv, sys.argv = sys.argv, [f"switch-{command}", *args]
    try:
        if command == "plot":  # argparse, not absl: main returns the status
            return module.main(args)
        module.console_main()
        return 0
    except SystemExit as e:
        return 0 if e.code is None else e.code
    finally:
        sys.argv = argv
        sys.unraisablehook, threading.excepthook = hooks
        flags.FLAGS.unparse_flags()
