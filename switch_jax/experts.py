"""`python -m switch_jax.experts --gin.MODEL_DIR=D [--step=N] [--split=S] [--max_batches=20]`:
what each expert of every MoE layer sees on a task split: its share of the tokens, drops, router
confidence, the tokens it takes most (and most unusually: lift over the corpus), the input
positions it takes, and the dead experts. A table on stdout; JSON and PNGs in D/experts (or
--output_dir). The model and task come from D/config.gin, as for switch-eval."""

from __future__ import annotations

import sys

from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError
from switch_jax.report import expert_plots

_STEP = cli.define_flag(flags.DEFINE_string, "step", "latest", "checkpoint: 'latest', 'all', N")
_SPLIT = cli.define_flag(flags.DEFINE_string, "split", "validation", "task split to route")
_MAX_BATCHES = cli.define_flag(
    flags.DEFINE_integer, "max_batches", 20, "batches of the split to route", lower_bound=1
)
_DEAD = cli.define_flag(
    flags.DEFINE_float,
    "dead_threshold",
    0.1,
    "an expert taking less than this multiple of an even share is dead",
    lower_bound=0.0,
)
_MIN_COUNT = cli.define_flag(
    flags.DEFINE_integer, "min_count", 5, "picks a token needs to be listed", lower_bound=1
)
_BUCKETS = cli.define_flag(
    flags.DEFINE_integer, "position_buckets", 4, "equal input-position buckets", lower_bound=1
)
_OUTPUT_DIR = cli.define_flag(
    flags.DEFINE_string,
    "output_dir",
    None,
    "where the JSON and PNGs go (default MODEL_DIR/experts)",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin.MODEL_DIR= / --step=")
    if _STEP.value == "all":
        raise ConfigError(
            "--step=all is for switch-eval; switch-experts reports one: 'latest' or N"
        )
    from switch_jax.report import expert_view
    from switch_jax.tools import expert_capture

    configs = cli.stored_run_configs(_STEP.value)
    expert_capture.check_reportable(configs.model)
    cli.check_task(configs)
    report, files = expert_capture.report_experts(
        configs,
        step=_STEP.value,
        split=_SPLIT.value,
        max_batches=_MAX_BATCHES.value,
        dead_threshold=_DEAD.value,
        min_count=_MIN_COUNT.value,
        buckets=_BUCKETS.value,
        output_dir=_OUTPUT_DIR.value,
    )
    print(
        f"{report['model_dir']} step {report['step']}: {report['batches']} batches of "
        f"{report['split']!r}",
        flush=True,
    )
    print(expert_view.format_table(report), flush=True)
    print(f"wrote {files[0]} and {len(files) - 1} PNGs", file=sys.stderr, flush=True)


console_main = cli.entry(
    main, gin=False, extra_errors=(expert_plots.PlotError,)
)  # console script `switch-experts`

if __name__ == "__main__":
    console_main()
