"""Chip facts in one table: peak bf16 FLOP/s, HBM size and bandwidth, ICI / DCN bandwidth, names.

    chip = by_name("v5litepod")            # Cloud TPU names and their aliases -> Chip('v5e', ...)
    peak_flops_per_device("TPU v4")        # jax's device_kind -> FLOP/s per JAX device
    peak_flops()                           # all devices of this job (CPU: a timed matmul)

Used by report/metrics.py (MFU), tools/aot.py (HBM budget of a TPU slice), tools/roofline.py
(step time from the compiled cost) and the benchmarks, so a new chip or a corrected number is one
row here. Every bandwidth is the vendor's published figure (sources beside the rows); one that
was not found is None, and the roofline then says 'unknown' for its term.
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
      hbm_bandwidth: HBM bytes/s of the chip.
      ici_bandwidth: inter-chip interconnect bytes/s of the chip, all links, both directions
        together (Cloud TPU's "bidirectional ICI bandwidth per chip"); half of it leaves the chip.
      dcn_bandwidth: data-center network bytes/s per chip, one direction (a host's NICs shared
        by its chips), what multi-slice traffic crosses.
    """

    name: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float
    devices_per_chip: int = 1
    hbm_bytes: int | None = None
    aliases: tuple[str, ...] = ()
    hbm_bandwidth: float | None = None
    ici_bandwidth: float | None = None
    dcn_bandwidth: float | None = None

    @property
    def peak_flops_per_device(self) -> float:
        """Dense bf16 FLOP/s of one JAX device of this chip."""
        return self.peak_bf16_flops / self.devices_per_chip


# Matched against device_kind in this order, first match wins: the more specific names come first
# ("v5 lite" before "v5", which is what v5p reports; "h100 pcie" before "h100", the SXM part).
# Sources (read 2026): Cloud TPU system architecture pages docs.cloud.google.com/tpu/docs/v6e,
# /v5e, /v5p, /v4 ("HBM bandwidth per chip", "Bidirectional ICI bandwidth (per chip)", "DCN
# bandwidth per chip" or "Per-host NIC configuration" with "Chips per host"); NVIDIA's H100, H200
# and A100 datasheets ("GPU memory bandwidth"). Not published there, so None: ICI and DCN of v4,
# DCN of v6e; NVLink is not modelled (GPU rows have no ICI figure).
GB = 1e9
CHIPS = (
    # v6e: HBM 1638 GBps, bidirectional ICI 800 GBps per chip (4 ports).
    Chip(
        "v6e",
        ("v6 lite", "v6e"),
        918e12,
        hbm_bytes=int(31.25 * GiB),
        hbm_bandwidth=1638 * GB,
        ici_bandwidth=800 * GB,
    ),
    # v5e: HBM 819 GBps, bidirectional ICI 400 GBps per chip; DCN 2 x 100 Gbps NICs per host of
    # 8 chips = 25 Gbps per chip.
    Chip(
        "v5e",
        ("v5 lite", "v5e"),
        197e12,
        hbm_bytes=int(15.75 * GiB),
        aliases=("v5litepod", "v5lite"),
        hbm_bandwidth=819 * GB,
        ici_bandwidth=400 * GB,
        dcn_bandwidth=2 * 100e9 / 8 / 8,
    ),
    # v5p: HBM 2765 GBps, bidirectional ICI 1200 GBps per chip, DCN 50 Gbps per chip.
    Chip(
        "v5p",
        ("v5p", "v5"),
        459e12,
        hbm_bytes=int(95.74 * GiB),
        hbm_bandwidth=2765 * GB,
        ici_bandwidth=1200 * GB,
        dcn_bandwidth=50e9 / 8,
    ),
    # v4: HBM2 1200 GBps (the page gives pod all-reduce and bisection bandwidth, not per chip).
    Chip("v4", ("v4",), 275e12, hbm_bytes=int(30.75 * GiB), hbm_bandwidth=1200 * GB),
    Chip("v3", ("v3",), 123e12, devices_per_chip=2),
    Chip("v2", ("v2",), 45e12, devices_per_chip=2),
    Chip("h200", ("h200",), 989e12, hbm_bandwidth=4.8e12),  # SXM, HBM3e 4.8 TB/s
    Chip("h100-pcie", ("h100 pcie",), 756e12, hbm_bandwidth=2.0e12),  # HBM 2 TB/s
    Chip("h100", ("h100",), 989e12, hbm_bandwidth=3.35e12),  # SXM, HBM3 3.35 TB/s
    Chip("a100", ("a100",), 312e12, hbm_bandwidth=1.555e12),  # 40GB HBM2 (80GB: 2.039 TB/s)
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


def measure_cpu_memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a streaming float32 scale (read `mib` MiB, write as much) on the host CPU, best
    of `repeats`: the HBM term's counterpart when the roofline is checked on this host."""
    import jax

    cpu = jax.devices("cpu")[0]
    x = jax.device_put(np.ones(mib * 2**18, np.float32), cpu)
    scale = jax.jit(lambda a: a * 1.5)
    scale(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scale(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def host_is_cpu() -> bool:
    """Whether this job runs on CPU devices (where the peak is measured, not tabled)."""
    import jax

    return jax.devices()[0].platform == "cpu"


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
