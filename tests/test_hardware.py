"""report/hardware: the chip table read by device kind and by Cloud TPU name, the CPU peak."""

from switch_jax.report import hardware
from switch_jax.tools import aot


def test_peak_table():
    kinds = {
        "TPU v3": 61.5e12,
        "TPU v4": 275e12,
        "TPU v5 lite": 197e12,
        "TPU v5e": 197e12,
        "TPU v5p": 459e12,
        "TPU v5": 459e12,
        "TPU v6 lite": 918e12,
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H200": 989e12,
    }
    for kind, flops in kinds.items():
        assert hardware.peak_flops_per_device(kind) == flops, kind
    assert hardware.peak_flops_per_device("cpu") is None
    assert 1e8 < hardware.measure_cpu_peak(n=256, repeats=2) < 1e14


def test_names_and_aliases():
    assert hardware.by_name("v5litepod") is hardware.by_name("v5lite") is hardware.by_name("v5e")
    assert hardware.by_name("V5P").peak_bf16_flops == 459e12
    assert hardware.by_name("v3").peak_bf16_flops == 123e12  # two 61.5 TFLOP/s devices
    assert hardware.by_name("tpu") is None


def test_aot_generations_read_the_same_chips():
    # The HBM budgets the AOT fit table was measured with (libtpu 0.0.42's "available HBM").
    hbm_gib = {"v4": 30.75, "v5p": 95.74, "v5e": 15.75, "v6e": 31.25}
    for name, gen in aot.GENERATIONS.items():
        assert gen.chip is hardware.by_name(name)
        assert gen.hbm_bytes == int(hbm_gib[name] * 2**30), name
        assert gen.peak_bf16_flops == hardware.peak_flops_per_device(f"TPU {name}"), name
