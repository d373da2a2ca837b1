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


def test_bandwidth_table():
    # The published figures (sources in report/hardware.py), in bytes/s; None = not published.
    gb = 1e9
    want = {
        "v6e": (1638 * gb, 800 * gb, None),
        "v5e": (819 * gb, 400 * gb, 200e9 / 8 / 8),  # 2 x 100 Gbps NICs per 8-chip host
        "v5p": (2765 * gb, 1200 * gb, 50e9 / 8),
        "v4": (1200 * gb, None, None),
        "h100": (3.35e12, None, None),
        "h200": (4.8e12, None, None),
    }
    for name, figures in want.items():
        chip = hardware.by_name(name)
        assert (chip.hbm_bandwidth, chip.ici_bandwidth, chip.dcn_bandwidth) == figures, name
    assert hardware.by_device_kind("NVIDIA H100 PCIe").hbm_bandwidth == 2.0e12


def test_cpu_memory_bandwidth_is_measured():
    assert 1e8 < hardware.measure_cpu_memory_bandwidth(mib=16, repeats=2) < 1e13
