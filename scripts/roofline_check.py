"""Check tools/roofline.py where it can run: measured train steps on this host against its estimate.

    python scripts/roofline_check.py [--steps=5]

On one device of this host (the process never sets --xla_force_host_platform_device_count). On a
CPU: float32 activations, so that the measured float32 matmul peak (report/hardware's
measure_cpu_peak) is the right roof, and the host's streaming bandwidth
(measure_cpu_memory_bandwidth) as the "HBM". On a GPU: bfloat16 activations and the chip's row
of report/hardware.py. For three shapes of the tiny model it compiles the real train step
(tools/benchmarks/step.py), reads the compiled cost analysis, runs the estimate with those
figures and no collectives, and times the step (median of --steps after a warm-up). Prints one
markdown row per shape: the terms, the estimate and the measured step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from switch_jax.config import gin_config
from switch_jax.report import hardware
from switch_jax.tools import aot, roofline
from switch_jax.tools.benchmarks.step import StepRunner

F32 = "ModelConfig.dtype='float32'"
SHAPES = {  # name: gin bindings on top of models/tiny.gin, one device
    "tiny b8 64/16": ["BATCH_SIZE=8", "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"],
    "tiny b16 256/64": ["BATCH_SIZE=16", "TASK_FEATURE_LENGTHS={'inputs': 256, 'targets': 64}"],
    "d512 b8 128/32": [
        "BATCH_SIZE=8",
        "TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
        "ModelConfig.d_model=512",
        "ModelConfig.d_ff=2048",
        "ModelConfig.num_heads=8",
        "ModelConfig.head_dim=64",
    ],
}


def check(bindings: list[str], chip: hardware.Chip, steps: int) -> dict:
    dtype = [F32] if chip.name == "cpu" else []
    gin_config.parse_gin(["models/tiny.gin"], ["MESH_SHAPE=(1, 1, 1)", *dtype, *bindings])
    runner = StepRunner(gin_config.load_configs())
    cost = aot.cost_per_chip(runner.compiled)
    est = roofline.estimate(cost, {}, chip, chips=1, model_flops=runner.flops_per_step)
    runner.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = runner.step()
        next(iter(out.values())).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {
        "measured_s": statistics.median(times),
        "cost": cost,
        "model_flops": runner.flops_per_step,
        "estimate": est,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    if device.platform == "cpu":
        # Best of many, on a larger matmul than MFU uses: other jobs share these cores, and the
        # best window is the closest to what the hardware can do.
        peak = hardware.measure_cpu_peak(n=2048, repeats=10)
        bandwidth = hardware.measure_cpu_memory_bandwidth(repeats=10)
        chip = hardware.Chip("cpu", (), peak, hbm_bandwidth=bandwidth)
    else:
        chip = hardware.by_device_kind(device.device_kind)
        if chip is None or chip.hbm_bandwidth is None:
            raise SystemExit(f"no peak / HBM bandwidth for {device.device_kind!r}: add its row")
    print(
        f"{device.device_kind}: peak {chip.peak_bf16_flops / 1e9:.1f} GFLOP/s, memory "
        f"{chip.hbm_bandwidth / 1e9:.2f} GB/s"
    )
    print(
        "| shape | cost GFLOP | model GFLOP | cost GB | compute ms | memory ms | bound "
        "| estimate ms | measured ms | measured / compute | measured / estimate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, bindings in SHAPES.items():
        r = check(bindings, chip, args.steps)
        e, t = r["estimate"], r["estimate"]["terms_s"]
        print(
            f"| {name} | {r['cost']['flops'] / 1e9:.2f} | {r['model_flops'] / 1e9:.2f} "
            f"| {r['cost']['bytes'] / 1e9:.3f} | {t['compute'] * 1e3:.1f} | {t['hbm'] * 1e3:.1f} "
            f"| {e['bound']} | {e['step_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} "
            f"| {r['measured_s'] / t['compute']:.2f} | {r['measured_s'] / e['step_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
