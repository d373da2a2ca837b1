"""`python -m switch_jax.bench --gin_file=models/tiny.gin [--gin.X=V] [--json] [--variants=...]`

Benchmarks a gin-configured model on synthetic batches (no TensorFlow unless the `pipeline`
variant runs and TF is installed) and prints a table, or JSON with --json:
  step        compile time, step time (median of --steps after --warmup), tokens/s, MFU, memory
  dense       the dense twin (moe=None, same shapes: same FLOPs per token); Switch/dense ratio
  dispatches  the train step with each of --dispatches and the dense twin, timed interleaved:
              compile time, step time (wall and process CPU), Switch/dense ratios
  breakdown   each sparse FFN (with its noise) vs the dense FFN at the run's token counts, and
              the optimizer update over Switch vs dense parameters: the step delta they predict
  dispatch    one MoE layer fwd+bwd per --dispatches and the dense FFN, over group sizes x
              expert counts
  pipeline    the seqio task's packed rows/s vs the rows/s the step consumes
  checkpoint  the stall an async Orbax save adds to the step loop
MFU uses metrics.py's peak table; on CPU the peak is a float32 matmul timed in this process.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from switch_jax import cli
from switch_jax.models.config import DISPATCHES, GROUPED_MATMULS, ConfigError, MoeConfig
from switch_jax.tools.benchmarks import suite

_VARIANTS = cli.define_flag(
    flags.DEFINE_list, "variants", list(suite.DEFAULT_VARIANTS), f"subset of {suite.VARIANTS}"
)
_DISPATCHES = cli.define_flag(
    flags.DEFINE_list,
    "dispatches",
    ["einsum", "scatter", "sorted", "dropless"],
    "dispatches compared by the dispatches and dispatch variants (DISPATCH or "
    "DISPATCH:GROUPED_MATMUL, e.g. sorted:fused)",
)
_JSON = cli.define_flag(
    flags.DEFINE_bool, "json", False, "print JSON on stdout (the table goes to stderr)"
)
_OUTPUT = cli.define_flag(flags.DEFINE_string, "output", None, "also write the JSON to this file")
_STEPS = cli.define_flag(
    flags.DEFINE_integer, "steps", 10, "timed train steps (median reported)", lower_bound=1
)
_WARMUP = cli.define_flag(
    flags.DEFINE_integer, "warmup", 2, "untimed steps after compilation", lower_bound=0
)
_REPEATS = cli.define_flag(
    flags.DEFINE_integer, "repeats", 5, "timed calls per dispatch point", lower_bound=1
)
_GROUPS = cli.define_flag(
    flags.DEFINE_list, "dispatch_groups", ["256", "512", "1024", "2048", "4096"], "T"
)
_EXPERTS = cli.define_flag(flags.DEFINE_list, "dispatch_experts", ["8", "16", "32", "64"], "E")
_TOKENS = cli.define_flag(
    flags.DEFINE_integer,
    "dispatch_tokens",
    8192,
    "tokens per MoE layer call (G x T)",
    lower_bound=1,
)


def _counts(flag: flags.FlagHolder) -> list[int]:
    """The positive integers of a list flag, or one ConfigError naming the flag and value."""
    out = []
    for text in flag.value:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(
                f"--{flag.name}={','.join(flag.value)}: {text!r} is not a positive integer"
            )
        out.append(value)
    return out


def _known_dispatch(name: str) -> bool:
    """Whether MoeConfig accepts what `name` names (DISPATCH or DISPATCH:GROUPED_MATMUL)."""
    from switch_jax.tools.benchmarks.dispatch import moe_variant  # noqa: PLC0415 (models: jax)

    try:
        moe_variant(MoeConfig(), name)
    except ConfigError:
        return False
    return True


def main(argv) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin_file / --gin.NAME=")
    unknown = sorted(d for d in _DISPATCHES.value if not _known_dispatch(d))
    if unknown:
        raise ConfigError(
            f"--dispatches: unknown {unknown}; choose from {', '.join(DISPATCHES)}, optionally "
            f"with :GROUPED_MATMUL ({'|'.join(GROUPED_MATMULS)}), e.g. sorted:fused"
        )
    unknown = sorted(set(_VARIANTS.value) - set(suite.VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(suite.VARIANTS)}")
    dispatch = dict(
        group_sizes=_counts(_GROUPS),
        experts=_counts(_EXPERTS),
        total_tokens=_TOKENS.value,
        repeats=_REPEATS.value,
        dispatches=_DISPATCHES.value,
    )
    result = suite.run_benchmarks(
        cli.configs(),
        _VARIANTS.value,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        dispatch=dispatch,
        dispatches=_DISPATCHES.value,
    )
    suite.check_finite(result)
    text = json.dumps(result, indent=1)
    print(suite.format_table(result), file=sys.stderr if _JSON.value else sys.stdout, flush=True)
    if _JSON.value:
        print(text)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")


console_main = cli.entry(main)  # console script `switch-bench`


if __name__ == "__main__":
    console_main()
