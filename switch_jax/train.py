"""`python -m switch_jax.train --gin_file=F [--gin.NAME=VALUE ...]`: pre-train or fine-tune."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from switch_jax import gin_utils
from switch_jax.models.config import ModelConfig
from switch_jax.run_config import OptimizerConfig, TrainConfig

gin_utils.define_flags()


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one line, no traceback."""
    from switch_jax.checkpoints import CheckpointError
    from switch_jax.trainer import NonFiniteLossError

    # OSError: a full disk or a vanished mount mid-run is the operator's to fix, not a bug.
    errors: list[type[BaseException]] = [CheckpointError, NonFiniteLossError, OSError]
    try:
        from switch_jax.data import DataError

        errors.append(DataError)
    except ImportError:  # the data extra is not installed; ConfigError still covers the rest
        pass
    return tuple(errors)


def quiet_library_logs() -> None:
    """Orbax and TensorFlow log every save at INFO; keep the console to our progress lines
    unless the user asked for more with --verbosity."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_configured(work: Callable[[ModelConfig, TrainConfig, OptimizerConfig], Any]) -> Any:
    """Parse the gin flags and call `work` on the configs; user errors become one line, exit 1."""
    quiet_library_logs()
    gin_utils.parse_gin_flags()
    configs = gin_utils.load_run_configs()
    try:
        return work(*configs)
    except user_errors() as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str]) -> None:
    del argv
    from switch_jax import trainer

    run_configured(
        lambda model_cfg, run_cfg, opt_cfg: trainer.train(
            model_cfg, run_cfg, opt_cfg, operative_config=gin_utils.operative_config()
        )
    )


def run() -> None:
    """Console script `switch-train`."""
    gin_utils.run(main)


if __name__ == "__main__":
    run()
