"""`python -m switch_jax.compile --gin_file=F --topology=v5p-64 [--json]`: will it fit the pod?

Compiles the real train step ahead of time for a Cloud TPU slice on this (CPU) host and prints
the compile time, HBM per chip (arguments, outputs, temporaries, code; total vs the chip's),
FLOPs and bytes per step from the compiler's cost analysis, the collectives in the optimised
HLO with their sizes, and a roofline estimate of the step time on those chips
(switch_jax/tools/roofline.py). Progress lines (before and after the minutes-long compile) go
to stderr. MESH_SHAPE, BATCH_SIZE, TASK_FEATURE_LENGTHS, MICROBATCHES and
PARTITION_RULES come from gin as for train. A run that does not fit ends with one line naming
the shortfall and what to change (exit status 1); when the state alone exceeds the HBM it says
so before compiling. Needs libtpu (`pip install 'switch_jax[tpu]'`); switch_jax.tools.aot has the
library side.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError
from switch_jax.tools import aot

_TOPOLOGY = cli.define_flag(
    flags.DEFINE_string,
    "topology",
    None,
    "Cloud TPU accelerator type: v4-N, v5p-N, v5e-N (v5litepod-N) or v6e-N",
)
_NUM_SLICES = cli.define_flag(
    flags.DEFINE_integer, "num_slices", 1, "slices over DCN (with DCN_MESH_SHAPE)", lower_bound=1
)
_JSON = cli.define_flag(flags.DEFINE_bool, "json", False, "print one JSON object instead of text")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin_file/--gin.")
    if not _TOPOLOGY.value:
        raise ConfigError("--topology is required, e.g. --topology=v5p-64")
    r = aot.report(cli.configs(), _TOPOLOGY.value, _NUM_SLICES.value, log=_progress)
    print(json.dumps(r) if _JSON.value else aot.format_report(r))


def _progress(line: str) -> None:
    # stderr: stdout stays the report alone (one JSON object with --json).
    print(line, file=sys.stderr, flush=True)


console_main = cli.entry(main, hosts=False, extra_errors=(aot.DoesNotFitError,))  # `switch-compile`

if __name__ == "__main__":
    console_main()
