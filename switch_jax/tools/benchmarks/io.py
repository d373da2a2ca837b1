"""What the loop around the step costs: input-pipeline rate vs the step's consumption, and the
stall an async checkpoint save adds."""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time

import jax

from switch_jax.tools.benchmarks import timing
from switch_jax.tools.benchmarks.step import StepRunner


def bench_pipeline(runner: StepRunner, step_s: float, batches: int = 20) -> dict:
    """Packed rows/s of the run's seqio task vs the rows/s the train step consumes."""
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("seqio") is None:
        return {"skipped": "TensorFlow / seqio not installed (pip install .[data])"}
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow only when asked for)

    run = runner.data
    t0 = time.perf_counter()
    it = pipeline.make_batches(
        run.mixture_or_task_name,
        "train",
        run.feature_lengths,
        run.batch_size,
        runner.model_cfg.architecture,
        seed=runner.configs.train.seed,
    )
    next(it)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rows_per_s = run.batch_size * batches / (time.perf_counter() - t0)
    consumed = run.batch_size / step_s
    return {
        "task": run.mixture_or_task_name,
        "first_batch_s": first_s,
        "pipeline_rows_per_s": rows_per_s,
        "step_rows_per_s": consumed,
        "headroom": rows_per_s / consumed,  # < 1: the input pipeline limits training
    }


def bench_checkpoint(runner: StepRunner, steps: int = 5, repeats: int = 3) -> dict:
    """Blocking time of Checkpoints.save (async) and the slowdown of the steps right after it."""
    from switch_jax.store.checkpoints import Checkpoints  # noqa: PLC0415 (orbax import is slow)

    base, save_s, after, wait_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Checkpoints(tmp, period=1, keep=1, async_save=True)
        for r in range(repeats):
            base += _step_times(runner, steps)
            # The last step must be done, else save() would be charged for finishing it.
            jax.block_until_ready(runner.state)
            t0 = time.perf_counter()
            ckpts.save(r + 1, runner.state, force=True)
            save_s.append(time.perf_counter() - t0)
            after += _step_times(runner, steps)
            t0 = time.perf_counter()
            ckpts.wait()
            wait_s.append(time.perf_counter() - t0)
        ckpts.close()
    base_median, after_median = statistics.median(base), statistics.median(after)
    return {
        "state_bytes": sum(x.nbytes for x in jax.tree.leaves(runner.state)),
        "save_call": timing.summarize(save_s),
        "step_s_without_save": base_median,
        "step_s_after_save": after_median,
        "first_step_after_save_s": statistics.median(after[::steps]),
        "wait_for_commit": timing.summarize(wait_s),
        # Loop time lost per save: the blocking call plus the extra time of the steps after it.
        "stall_s": statistics.median(save_s) + steps * (after_median - base_median),
    }


def _step_times(runner: StepRunner, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(runner.step())
        out.append(time.perf_counter() - t0)
    return out
