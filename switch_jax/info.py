"""What a run costs: parameters, FLOPs and per-device bytes of its train state, without devices.

    python -m switch_jax.info --gin_file=models/switch_base.gin [--gin.MESH_SHAPE="(1, 8, 1)"]
        [--num_devices=N] [--json]

The model and batch are checked against the mesh exactly as the trainer checks them; what is
counted and how is said in switch_jax/tools/planner.py. Activations and XLA's temporaries come on
top (`python -m switch_jax.compile` measures those for a TPU topology).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError
from switch_jax.tools import planner

_JSON = cli.define_flag(flags.DEFINE_bool, "json", False, "print one JSON object instead of text")
_NUM_DEVICES = cli.define_flag(
    flags.DEFINE_integer,
    "num_devices",
    None,
    "total devices, to resolve a -1 in MESH_SHAPE (default: it counts 1)",
    lower_bound=1,
)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin_file / --gin.NAME=")
    r = planner.report(cli.configs(), _NUM_DEVICES.value)
    print(json.dumps(r) if _JSON.value else planner.format_report(r))


console_main = cli.entry(main, hosts=False)  # console script `switch-info`; needs no device


if __name__ == "__main__":
    console_main()
