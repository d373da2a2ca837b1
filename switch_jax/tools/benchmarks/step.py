"""Train-step benchmark on synthetic batches: compile time, step time, tokens/s, MFU, memory."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from switch_jax.config.settings import Configs
from switch_jax.models.config import ModelConfig
from switch_jax.parallel import compile_cache
from switch_jax.report import metrics
from switch_jax.tools.benchmarks import dispatch as dispatch_bench
from switch_jax.tools.benchmarks import kernels, timing
from switch_jax.training import build


def synthetic_batch(model_cfg: ModelConfig, batch_size: int, lens, seed: int = 0) -> dict:
    """Random tokens, every position real: the names and shapes of a packed T5X batch."""
    rng = np.random.default_rng(seed)
    inputs, targets = lens

    def tokens(length):
        # From 2: no pad (0) or EOS (1), so no position is masked and every token costs FLOPs.
        return rng.integers(2, model_cfg.vocab_size, size=(batch_size, length), dtype=np.int32)

    def layout(prefix, length):
        ones = np.ones((batch_size, length), np.int32)
        positions = np.tile(np.arange(length, dtype=np.int32), (batch_size, 1))
        return {f"{prefix}_segment_ids": ones, f"{prefix}_positions": positions}

    target = tokens(targets)
    batch = {
        "decoder_input_tokens": np.roll(target, 1, axis=1),
        "decoder_target_tokens": target,
        "decoder_loss_weights": np.ones_like(target),
        **layout("decoder", targets),
    }
    if model_cfg.is_encoder_decoder:
        batch.update(encoder_input_tokens=tokens(inputs), **layout("encoder", inputs))
    return batch


class StepRunner:
    """A compiled train step on one fixed synthetic batch, for timing and the I/O benchmarks."""

    def __init__(self, configs: Configs):
        self.configs = configs
        built = build.build_run(configs)
        self.partitioner, self.model_cfg, self.info = built.partitioner, built.model_cfg, built.info
        self.data, self.lens = configs.data, built.lengths
        p = self.partitioner
        with p.activate():
            self.setup = built.setup
            self.state = self.setup.init_state()
            self.inputs = self.setup.inputs()  # the objective's (a distillation teacher's)
            batch = synthetic_batch(self.model_cfg, self.data.batch_size, self.lens)
            self.batch = p.shard_batch(batch)
            # Lowered and compiled explicitly, so that compile time is measured apart and every
            # timed call runs the executable (no tracing, no cache look-up).
            compile_cache.watch()
            t0, loads = time.perf_counter(), compile_cache.hits()
            lowered = self.setup.train_step.jitted.lower(self.state, self.batch, *self.inputs)
            self.compiled = lowered.compile()
            self.compile_s = time.perf_counter() - t0
            # A persistent cache that $JAX_COMPILATION_CACHE_DIR turned on answers with a load.
            self.compile_from_cache = compile_cache.hits() > loads

    def step(self):
        """One train step; the state is donated and replaced. Returns the metrics."""
        self.state, out = self.compiled(self.state, self.batch, *self.inputs)
        return out

    @property
    def tokens_per_step(self) -> int:
        """Token slots of one batch (inputs + targets), padding included: none is synthetic."""
        return self.data.batch_size * sum(self.lens)

    @property
    def flops_per_step(self) -> float:
        """Forward + backward FLOPs of one step (what MFU divides by)."""
        return metrics.train_flops_per_step(self.info, self.data.batch_size)


def time_interleaved(runners: list[StepRunner], steps: int, warmup: int):
    """Wall and CPU step times of several runners, alternating step by step so that load from
    other processes on a shared machine hits all of them alike: ([wall], [cpu]) per runner."""
    return timing.interleaved([r.step for r in runners], steps, warmup)


def report(runner: StepRunner, seconds: list[float], peak: float | None, cpu=None) -> dict:
    """JSON-ready figures of one runner from its timed steps (wall, and CPU if given)."""
    t = timing.summarize(seconds)
    step_s = t["median_s"]
    return {
        "model": "switch" if runner.model_cfg.moe else "dense",
        "batch_size": runner.data.batch_size,
        "lengths": list(runner.lens),
        "tokens_per_step": runner.tokens_per_step,
        "params": runner.info.total_params,
        "flops_per_token": runner.info.flops_per_token,
        "flops_per_step": runner.flops_per_step,
        "compile_s": runner.compile_s,
        "compile_from_cache": runner.compile_from_cache,
        # The figure the compile time follows, the same on every run (kernels.py).
        "kernels": _kernels(runner.compiled),
        "step_s": step_s,
        "step": t,
        "cpu_s": statistics.median(cpu) if cpu else None,
        "dispatch": runner.model_cfg.moe.dispatch if runner.model_cfg.moe else None,
        "tokens_per_s": runner.tokens_per_step / step_s,
        "mfu": metrics.mfu(runner.flops_per_step, step_s, peak) if peak else None,
        "mfu_best_step": metrics.mfu(runner.flops_per_step, t["min_s"], peak) if peak else None,
        "compiled_bytes": timing.compiled_bytes(runner.compiled),
        "device_peak_bytes": timing.device_peak_bytes(),
        "process_max_rss_bytes": timing.process_max_rss_bytes(),
        # One more step read back: a finite loss shows the timed steps computed something.
        "loss": float(jax.device_get(runner.step()["loss"])),
    }


def ratio(a: list[float], b: list[float]) -> dict:
    """Step-time ratio a/b: of the medians, and the median and spread of step-paired ratios."""
    pairs = sorted(x / y for x, y in zip(a, b, strict=True))
    return {
        "of_medians": statistics.median(a) / statistics.median(b),
        "of_mins": min(a) / min(b),
        "paired_median": statistics.median(pairs),
        "paired_min": pairs[0],
        "paired_max": pairs[-1],
    }


def with_dispatch(configs: Configs, dispatch: str) -> Configs:
    """The same run with the MoE layers' dispatch set to `dispatch` (see moe_variant)."""
    moe = dispatch_bench.moe_variant(configs.model.moe, dispatch)
    return configs.replace(model=configs.model.replace(moe=moe))


def dense_twin(configs: Configs) -> Configs:
    """The dense model with the same FLOPs per token: same shapes, moe=None (k=1 routing)."""
    return configs.replace(model=configs.model.replace(moe=None))


def _kernels(compiled) -> dict | None:
    count = kernels.of_compiled(compiled)
    return None if count is None else dataclasses.asdict(count)
