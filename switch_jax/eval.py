"""`python -m switch_jax.eval --gin.MODEL_DIR=D [--gin_file=runs/eval.gin] [--step=latest|all|N]`:
checkpoints on validation data: teacher-forced loss / accuracy and, for tasks with metrics
(GLUE, SuperGLUE, docstring_package, ...), the task metrics of decoded predictions. The model and
task come from MODEL_DIR/config.gin unless gin files given here override them."""

from __future__ import annotations

import json

from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError

_STEP = cli.define_flag(flags.DEFINE_string, "step", "latest", "checkpoint: 'latest', 'all', N")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin.MODEL_DIR= / --step=")
    from switch_jax.training import trainer

    configs = cli.stored_run_configs(_STEP.value)
    cli.check_task(configs)
    for step, metrics in trainer.evaluate_checkpoints(configs, _STEP.value):
        print(json.dumps({"step": step, **metrics}, sort_keys=True), flush=True)


console_main = cli.entry(main, gin=False)  # console script `switch-eval`

if __name__ == "__main__":
    console_main()
