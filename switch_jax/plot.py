"""`python -m switch_jax.plot MODEL_DIR [--out DIR]`: PNGs of a run from its metrics.jsonl files.

Writes loss, learning-rate, throughput, expert-load and MoE-health plots into MODEL_DIR/plots
(or --out); switch_jax/report/plots.py lists what each one shows. Needs matplotlib
(`pip install switch_jax[plot]`). Works on a run in progress.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from switch_jax.report import plots


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switch-plot", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="the run's MODEL_DIR (holds train/ and eval/)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (MODEL_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        for path in plots.plot_run(args.model_dir, args.out):
            print(path)
    except plots.PlotError as e:
        print(f"PlotError: {e}", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    """Console script `switch-plot`."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
