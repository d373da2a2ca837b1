"""`python -m switch_jax.eval --gin_file=F --gin.MODEL_DIR=D`: a checkpoint on validation data."""

from __future__ import annotations

import json

from switch_jax import gin_utils
from switch_jax.train import run_configured

gin_utils.define_flags()


def main(argv: list[str]) -> None:
    del argv
    from switch_jax import trainer

    step, metrics = run_configured(trainer.evaluate_checkpoint)
    print(json.dumps({"step": step, **metrics}, sort_keys=True))


def run() -> None:
    """Console script `switch-eval`."""
    gin_utils.run(main)


if __name__ == "__main__":
    run()
