"""`python -m switch_jax.eval --gin_file=F --gin.MODEL_DIR=D`: a checkpoint on validation data."""

from __future__ import annotations

import json
import sys

from switch_jax import gin_utils
from switch_jax.train import quiet_library_logs, user_errors

gin_utils.define_flags()


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    gin_utils.parse_gin_flags()
    model_cfg, run_cfg, opt_cfg = gin_utils.load_run_configs()
    from switch_jax import trainer

    try:
        step, metrics = trainer.evaluate_checkpoint(model_cfg, run_cfg, opt_cfg)
    except user_errors() as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"step": step, **metrics}, sort_keys=True))


if __name__ == "__main__":
    gin_utils.run(main)
