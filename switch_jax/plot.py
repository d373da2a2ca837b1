"""`python -m switch_jax.plot MODEL_DIR [--out DIR]`: PNGs of a run from its metrics.jsonl files.

Reads MODEL_DIR/train/metrics.jsonl and MODEL_DIR/eval/metrics.jsonl (what the trainer writes)
and writes into MODEL_DIR/plots (or --out):

  loss.png          train loss and cross-entropy, eval loss and cross-entropy
  learning_rate.png the schedule as logged
  throughput.png    tokens/s and MFU (the first logged step, which includes compilation, is left
                    out)
  expert_load.png   one heatmap per MoE layer: each expert's share of tokens over steps, as a
                    multiple of an even share (1.0 = balanced; 0 = an idle expert)
  moe_health.png    per MoE layer: fraction of token assignments dropped (over capacity), router
                    confidence (mean top-k probability) and the load-balancing loss

Needs matplotlib (`pip install switch_jax[plot]`). Works on a run in progress.
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
