"""Timing and memory helpers shared by the benchmarks: medians with spread, peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def summarize(seconds: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of repeated timings."""
    median = statistics.median(seconds)
    return {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "spread": (max(seconds) - min(seconds)) / median if median > 0 else 0.0,
        "n": len(seconds),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of `fn()` blocked until ready. On a shared machine the CPU
    time (all of this process's threads) is the steadier measure of the work done."""
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: list[Callable[[], Any]], repeats: int, warmup: int = 1):
    """Wall and CPU seconds of each fn, calls alternating so that outside load hits all alike:
    ([wall per fn], [cpu per fn])."""
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, w, c in zip(fns, wall, cpu, strict=True):
            dw, dc = timed(fn)
            w.append(dw)
            c.append(dc)
    return wall, cpu


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 1) -> dict:
    """Wall time of `fn()` (blocked until ready), `warmup` untimed calls first."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - t0)
    return summarize(seconds)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 where the backend reports it (GPU/TPU); None on CPU."""
    stats = jax.devices()[0].memory_stats()  # the CPU client returns None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def process_max_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of one compiled executable (XLA's memory analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if m is None:
        return None
    # A donated argument is also an output (same buffer): count it once.
    alias = getattr(m, "alias_size_in_bytes", 0)
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - alias
    return int(total)
