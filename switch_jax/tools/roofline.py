"""Step time before launch: a roofline of the compiled train step on the target chips.

    est = estimate(cost, collectives, chip, chips=32, num_slices=1, model_flops=...)
    format_estimate(est) -> "step estimate  >= 55.0 ms (compute-bound) ..."

Each term is a time per step on one chip (the compiled program is per chip):

    compute = FLOPs / peak bf16 FLOP/s
    HBM     = bytes accessed x loop scale / HBM bandwidth
    ICI     = sum over collectives of traffic / (ICI bandwidth / 2)
    DCN     = sum over megascale sends of traffic / DCN bandwidth per chip

FLOPs and bytes are XLA's cost analysis. It counts a while loop's body once, so a scanned stack
(or MICROBATCHES) undercounts: FLOPs are then max(cost analysis, the model's train FLOPs / chips)
and the bytes are scaled by the same ratio ("loop scale", assuming the loop bodies move as many
bytes per FLOP as the whole step). The model's train FLOPs are 3 x the forward FLOPs of
models/size.py, the count MFU uses everywhere.

Collective traffic: the bytes one chip sends for a collective whose result is R bytes per chip,
over a group of N chips, with the bandwidth-optimal (ring / recursive) algorithms:

    all-gather          R (N-1)/N       (R the gathered result)
    reduce-scatter      R (N-1)         (R the chip's slice; N R were reduced)
    all-reduce          2 R (N-1)/N     (a reduce-scatter, then an all-gather)
    all-to-all          R (N-1)/N       (the part that stays on the chip does not move)
    collective-permute  R

over half the chip's published bidirectional ICI bandwidth (what leaves it on all its links at
once). Cross-slice traffic is what the compiler hands the megascale runtime (hlo.py's "dcn"),
D bytes per send over S slices: 2 D (S-1)/S for an all-reduce, D (S-1) otherwise, at the chip's
share of its host's DCN bandwidth.

The estimate is the largest term, i.e. it assumes compute, HBM traffic and communication overlap
perfectly, and ignores latency, launch gaps and links a collective cannot use (a group along one
torus axis uses 2 of a chip's 4 or 6 links): a lower bound on the step time, as far as XLA's
"bytes accessed" (every fusion's operands and results) is HBM traffic; on a CPU, where much of it
stays in caches, it is not (docs/tpu.md has the check). The sum of the terms
(nothing overlapped) is given beside it. MFU = model train FLOPs / (step time x chips x peak).
A term whose bandwidth is not in report/hardware.py is 'unknown' when it has traffic.
"""

from __future__ import annotations

from switch_jax.report import hardware

ASSUMPTION = (
    "a lower bound if XLA's bytes accessed all cross HBM: the largest term, as if compute, HBM "
    "and communication overlapped perfectly; no latency, every ICI link in use"
)


def traffic(kind: str, result_bytes: float, group: int) -> float:
    """Bytes one chip sends for a collective with `result_bytes` per chip over `group` chips."""
    n = max(group, 1)
    if kind == "all-reduce":
        return 2 * result_bytes * (n - 1) / n
    if kind == "reduce-scatter":
        return result_bytes * (n - 1)
    if kind in ("all-gather", "all-to-all"):
        return result_bytes * (n - 1) / n
    if kind == "collective-permute":
        return result_bytes
    raise ValueError(f"unknown collective {kind!r}")


def ici_traffic(collectives: dict, chips_per_slice: int) -> float:
    """Bytes a chip sends over ICI per step. A group of "all" (or a record without groups, from
    before hlo.py kept them) spans every chip of the slice."""
    total = 0.0
    for kind, c in collectives.items():
        if kind in ("dcn", "loop_trips") or not c.get("count"):
            continue
        by_group = c.get("by_group") or {"all": c["bytes"]}
        for group, size in by_group.items():
            total += traffic(kind, size, chips_per_slice if group == "all" else int(group))
    return total


def dcn_traffic(collectives: dict, num_slices: int) -> float:
    """Bytes a chip sends over DCN per step (the megascale sends of a multi-slice program)."""
    dcn = collectives.get("dcn") or {}
    if num_slices < 2 or not dcn.get("bytes"):
        return 0.0
    s, reduce = num_slices, dcn.get("reduce_bytes", 0)
    return 2 * reduce * (s - 1) / s + (dcn["bytes"] - reduce) * (s - 1)


def _time(amount: float, rate: float | None) -> float | None:
    if not amount:
        return 0.0
    return amount / rate if rate else None


def estimate(
    cost: dict,
    collectives: dict,
    chip: hardware.Chip,
    *,
    chips: int,
    num_slices: int = 1,
    model_flops: float,
) -> dict:
    """The roofline terms of one step (seconds), the bound, the step time and the MFU it implies.

    Args:
      cost: {"flops", "bytes"} per chip and step from the compiled cost analysis.
      collectives: hlo.collectives of the compiled program (per chip and step).
      chip: the target chip's figures (report/hardware.py).
      chips: chips of all slices; num_slices: how many slices (DCN between them).
      model_flops: the model's train FLOPs per step (all chips).
    """
    per_chip = model_flops / chips
    loops = any(n > 1 for n in collectives.get("loop_trips") or ())
    scale = max(1.0, per_chip / cost["flops"]) if loops and cost["flops"] else 1.0
    flops = max(cost["flops"], per_chip)
    ici_bytes = ici_traffic(collectives, chips // num_slices)
    dcn_bytes = dcn_traffic(collectives, num_slices)
    terms = {
        "compute": _time(flops, chip.peak_bf16_flops),
        "hbm": _time(cost["bytes"] * scale, chip.hbm_bandwidth),
        "ici": _time(ici_bytes, chip.ici_bandwidth and chip.ici_bandwidth / 2),
        "dcn": _time(dcn_bytes, chip.dcn_bandwidth),
    }
    known = {k: t for k, t in terms.items() if t is not None}
    step_s = max(known.values())
    return {
        "chip": chip.name,
        "peak_flops": chip.peak_bf16_flops,
        "hbm_bandwidth": chip.hbm_bandwidth,
        "ici_bandwidth": chip.ici_bandwidth,
        "dcn_bandwidth": chip.dcn_bandwidth,
        "flops": flops,
        "flops_source": "cost analysis" if cost["flops"] >= per_chip else "model",
        "hbm_bytes": cost["bytes"] * scale,
        "loop_scale": scale,
        "ici_bytes": ici_bytes,
        "dcn_bytes": dcn_bytes,
        "terms_s": terms,
        "unknown": sorted(k for k, t in terms.items() if t is None),
        "bound": max(known, key=known.get),
        "step_s": step_s,
        "serial_s": sum(known.values()),
        "mfu": model_flops / (step_s * chips * chip.peak_bf16_flops) if step_s else 0.0,
        "assumption": ASSUMPTION,
    }


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds * 1e3:.3g} ms" if seconds else "none"


def format_estimate(e: dict, indent: str = "step estimate  ") -> str:
    """Two lines: the bound and MFU, then each term with the figure it used."""
    t, gb = e["terms_s"], 1e9
    hbm = f"HBM {_ms(t['hbm'])} ({e['hbm_bytes'] / gb:.3g} GB"
    hbm += f" at {e['hbm_bandwidth'] / gb:.0f} GB/s" if e["hbm_bandwidth"] else ""
    hbm += f", loop bodies x{e['loop_scale']:.3g})" if e["loop_scale"] > 1 else ")"
    ici = f"ICI {_ms(t['ici'])} ({e['ici_bytes'] / gb:.3g} GB sent"
    ici += f" at {e['ici_bandwidth'] / 2 / gb:.0f} GB/s out)" if e["ici_bandwidth"] else ")"
    dcn = f"DCN {_ms(t['dcn'])}" + (
        f" ({e['dcn_bytes'] / gb:.3g} GB at {e['dcn_bandwidth'] / gb:.3g} GB/s)"
        if e["dcn_bytes"] and e["dcn_bandwidth"]
        else ""
    )
    unknown = f"; {', '.join(e['unknown'])} unknown (no bandwidth figure)" if e["unknown"] else ""
    pad = " " * len(indent)
    return "\n".join(
        [
            f"{indent}>= {_ms(e['step_s'])} per step on {e['chip']}, {e['bound']}-bound "
            f"(MFU <= {e['mfu'] * 100:.2g}%); all terms serial: {_ms(e['serial_s'])}{unknown}",
            f"{pad}compute {_ms(t['compute'])} ({e['flops'] / 1e12:.3g} TFLOP from the "
            f"{e['flops_source']} at {e['peak_flops'] / 1e12:.0f} TFLOP/s), {hbm}, {ici}, {dcn}",
            f"{pad}({e['assumption']})",
        ]
    )
