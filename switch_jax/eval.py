"""`python -m switch_jax.eval --gin_file=F --gin.MODEL_DIR=D`: a checkpoint on validation data."""

from __future__ import annotations

import json

from switch_jax import cli


def main(argv: list[str]) -> None:
    del argv
    from switch_jax import trainer

    step, metrics = trainer.evaluate_checkpoint(cli.configs())
    print(json.dumps({"step": step, **metrics}, sort_keys=True))


run = cli.entry(main)  # console script `switch-eval`

if __name__ == "__main__":
    run()
