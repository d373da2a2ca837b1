"""`python -m switch_jax.train --gin_file=F [--gin.NAME=VALUE ...]`: pre-train or fine-tune.

    switch-train --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"        # the demo
    switch-train --gin_file=models/switch_base.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR="'gs://bucket/run'" --gin.MESH_SHAPE="(-1, 8, 1)"
    switch-train --gin_file=runs/finetune_demo.gin --gin.INIT_CHECKPOINT="'runs/demo'" \\
      --gin.MODEL_DIR="'runs/ft'" --gin.MIXTURE_OR_TASK_NAME="'jsonl:my/train.jsonl'"

The same command resumes MODEL_DIR from its latest checkpoint (model, optimizer, step, RNG and
input position); Ctrl-C saves and prints it. Common macros: MODEL_DIR, TRAIN_STEPS, BATCH_SIZE,
MESH_SHAPE, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, LEARNING_RATE, INIT_CHECKPOINT,
EVAL_PERIOD, CHECKPOINT_PERIOD, WANDB_PROJECT (configs/defaults.gin lists them all).
"""

from __future__ import annotations

import gc

from switch_jax import cli
from switch_jax.models.config import ConfigError
from switch_jax.store import model_dir as model_dir_lib


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin_file / --gin.NAME=")
    from switch_jax.data import DataError
    from switch_jax.store.checkpoints import CheckpointError
    from switch_jax.training import trainer

    configs = cli.configs()
    cli.check_task(configs)
    model_dir = configs.checkpoint.model_dir
    new = bool(model_dir) and not model_dir_lib.absolute(model_dir).exists()
    try:
        trainer.train(configs, operative_config=cli.operative_config())
    except (ConfigError, DataError, CheckpointError):
        # A start refused before its first checkpoint must not leave a folder that looks like a
        # run (the next eval, or a typo's "did you mean", would take it for one). Other failures
        # (a non-finite loss, Ctrl-C) keep their metrics to look at.
        if new:
            model_dir_lib.remove_if_unused(model_dir)
        raise
    # The process ends here: spare the user the interpreter's final garbage collection of the
    # TensorFlow / JAX heap (seconds on a busy host) after the resume command was printed.
    gc.freeze()


console_main = cli.entry(main)  # console script `switch-train`

if __name__ == "__main__":
    console_main()
