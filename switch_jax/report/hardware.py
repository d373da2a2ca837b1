"""Chip facts in one table: peak dense bf16 FLOP/s, usable HBM, names; and this job's peak.

    chip = by_name("v5litepod")            # Cloud TPU names and their aliases -> Chip('v5e', ...)
    peak_flops_per_device("TPU v4")        # jax's device_kind -> FLOP/s per JAX device
    peak_flops()                           # all devices of this job (CPU: a timed matmul)

Used by report/metrics.py (MFU), tools/aot.py (HBM budget and time at peak of a TPU slice) and
the benchmarks, so a new chip or a corrected number is one row here.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip.

    Attributes:
      name: the short name Cloud TPU / NVIDIA use ('v5p', 'h100').
      device_kinds: lower-case substrings of jax's `device_kind` that mean this chip.
      peak_bf16_flops: dense bf16 FLOP/s of the whole chip.
      devices_per_chip: JAX devices the chip shows (TPU v2/v3 expose each TensorCore; v4 and
        v5p join their two as one "megacore" device).
      hbm_bytes: what XLA may use per chip (libtpu 0.0.42's own "available HBM", a little under
        the marketed size); None where nothing here needs it.
      aliases: other names of the same chip in accelerator types ('v5litepod-16').
    """

    name: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float
    devices_per_chip: int = 1
    hbm_bytes: int | None = None
    aliases: tuple[str, ...] = ()

    @property
    def peak_flops_per_device(self) -> float:
        """Dense bf16 FLOP/s of one JAX device of this chip."""
        return self.peak_bf16_flops / self.devices_per_chip


# Matched against device_kind in this order, first match wins: the more specific names come first
# ("v5 lite" before "v5", which is what v5p reports; "h100 pcie" before "h100", the SXM part).
CHIPS = (
    Chip("v6e", ("v6 lite", "v6e"), 918e12, hbm_bytes=int(31.25 * GiB)),  # Trillium
    Chip(
        "v5e",
        ("v5 lite", "v5e"),
        197e12,
        hbm_bytes=int(15.75 * GiB),
        aliases=("v5litepod", "v5lite"),
    ),
    Chip("v5p", ("v5p", "v5"), 459e12, hbm_bytes=int(95.74 * GiB)),
    Chip("v4", ("v4",), 275e12, hbm_bytes=int(30.75 * GiB)),
    Chip("v3", ("v3",), 123e12, devices_per_chip=2),
    Chip("v2", ("v2",), 45e12, devices_per_chip=2),
    Chip("h200", ("h200",), 989e12),
    Chip("h100-pcie", ("h100 pcie",), 756e12),
    Chip("h100", ("h100",), 989e12),  # SXM
    Chip("a100", ("a100",), 312e12),
)
_CPU_PEAK: float | None = None


def by_name(name: str) -> Chip | None:
    """The chip called `name` or one of its aliases ('v5p', 'v5litepod'); None if unknown."""
    name = name.lower()
    return next((c for c in CHIPS if name == c.name or name in c.aliases), None)


def by_device_kind(device_kind: str) -> Chip | None:
    """The chip behind a jax device_kind ('TPU v4', 'NVIDIA H100 80GB HBM3'); None if unknown."""
    kind = device_kind.lower()
    return next((c for c in CHIPS if any(k in kind for k in c.device_kinds)), None)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Dense bf16 peak of one device of a kind (e.g. 'TPU v4'); None if the kind is unknown."""
    chip = by_device_kind(device_kind)
    return chip.peak_flops_per_device if chip else None


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on the host CPU, best of `repeats` (cached).

    CPUs have no table row: their peak depends on the host's cores and vector units, and what
    MFU on CPU should compare against is what XLA's matmul actually reaches here.
    """
    global _CPU_PEAK
    if _CPU_PEAK is None:
        import jax
        import jax.numpy as jnp

        cpu = jax.devices("cpu")[0]
        a = jax.device_put(np.ones((n, n), np.float32), cpu)
        matmul = jax.jit(jnp.matmul)
        matmul(a, a).block_until_ready()  # compile outside the timing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = 2 * n**3 / best
    return _CPU_PEAK


def peak_flops() -> float | None:
    """Peak FLOP/s of all devices of the job; the CPU host counts once however many devices."""
    import jax

    devices = jax.devices()
    if devices[0].platform == "cpu":
        # Simulated CPU devices (--xla_force_host_platform_device_count) share one host's cores.
        return measure_cpu_peak() * jax.process_count()
    per_device = peak_flops_per_device(devices[0].device_kind)
    return per_device * len(devices) if per_device else None


if __name__ == "__main__":  # pragma: no cover - quick manual check of the table / CPU peak
    import sys

    print(f"peak FLOP/s of this job's devices: {peak_flops():.3g}", file=sys.stderr)
