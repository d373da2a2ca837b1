"""Input-pipeline throughput on the embedded corpus.

python -m switch_jax.tools.benchmarks.input_pipeline [--batch_size 32] [--batches 100]
"""

from __future__ import annotations

import argparse
import time

from switch_jax.data import pipeline

CASES = {
    "embedded_span_corruption": ("encoder_decoder", {"inputs": 512, "targets": 114}),
    "embedded_lm": ("decoder_only", {"targets": 512}),
}


def _fill(batch: dict, prefix: str) -> tuple[int, int]:
    """(real, total) token slots of the encoder or decoder side of a batch."""
    segments = batch[f"{prefix}_segment_ids"]
    return int((segments > 0).sum()), segments.size


def bench(task: str, batch_size: int, num_batches: int, seed: int) -> dict:
    """Rows/s and tokens/s of `task`'s packed train batches, and how full the packing is.

    Args:
      task: a key of CASES (an embedded-corpus task: no network, built and cached at first use).
      batch_size: rows per batch.
      num_batches: batches timed after the first one.
      seed: the pipeline's shuffle seed.
    """
    architecture, lengths = CASES[task]
    start = time.perf_counter()
    it = pipeline.make_batches(task, "train", lengths, batch_size, architecture, seed=seed)
    # The first batch pays for building the corpus / vocabulary and filling the shuffle buffer:
    # reported apart, since a long run pays it once.
    next(it)
    first = time.perf_counter() - start
    sides = ("encoder", "decoder") if architecture == "encoder_decoder" else ("decoder",)
    real = {s: 0 for s in sides}
    total = {s: 0 for s in sides}
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        for side in sides:
            r, t = _fill(batch, side)
            real[side] += r
            total[side] += t
    seconds = time.perf_counter() - start
    rows = batch_size * num_batches
    return {
        "task": task,
        "lengths": lengths,
        "first_batch_s": first,
        "rows_per_s": rows / seconds,
        "tokens_per_s": sum(total.values()) / seconds,
        "real_tokens_per_s": sum(real.values()) / seconds,
        "fill": {s: real[s] / total[s] for s in sides},
    }


def main(argv=None) -> None:
    """Command line: one line per task (rows/s, tokens/s, packing efficiency, first batch)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for task in args.tasks:
        r = bench(task, args.batch_size, args.batches, args.seed)
        fill = ", ".join(f"{side} {value:.3f}" for side, value in r["fill"].items())
        print(
            f"{r['task']} {r['lengths']} batch {args.batch_size}: "
            f"{r['rows_per_s']:.0f} packed rows/s, {r['tokens_per_s']:.0f} tokens/s "
            f"({r['real_tokens_per_s']:.0f} non-padding), packing efficiency {fill}, "
            f"first batch after {r['first_batch_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
