"""The variants `switch-bench` runs on a gin-configured model, on synthetic batches.

    result = run_benchmarks(configs, variants, steps=10, warmup=2, dispatch={...})
    print(format_table(result))

  step        compile time (and the distinct kernels it compiled: tools/benchmarks/kernels.py),
              step time (median of steps after warmup), tokens/s, MFU, memory
  dense       the dense twin (moe=None, same shapes: same FLOPs per token); Switch/dense ratio
  dispatches  the train step with each dispatch and the dense twin, timed interleaved:
              compile time, step time (wall and process CPU), Switch/dense ratios
  breakdown   each sparse FFN (with its noise) vs the dense FFN at the run's token counts, and
              the optimizer update over Switch vs dense parameters: the step delta they predict
  dispatch    one MoE layer fwd+bwd per dispatch and the dense FFN, over group sizes x
              expert counts
  pipeline    the seqio task's packed rows/s vs the rows/s the step consumes
  checkpoint  the stall an async Orbax save adds to the step loop
No TensorFlow unless the `pipeline` variant runs and TF is installed. MFU uses
report/hardware.py's chip table; on CPU the peak is a float32 matmul timed in this process.
"""

from __future__ import annotations

import json
import math

from switch_jax.config import gin_config

VARIANTS = ("step", "dense", "dispatches", "breakdown", "dispatch", "pipeline", "checkpoint")


DEFAULT_VARIANTS = ("step", "dense", "dispatch", "pipeline", "checkpoint")


def run_benchmarks(configs, variants, *, steps, warmup, dispatch, dispatches=None) -> dict:
    """All requested variants; returns the JSON-ready results dict."""
    import jax

    from switch_jax.parallel import host_malloc
    from switch_jax.report import hardware
    from switch_jax.tools.benchmarks import step as step_bench

    model_cfg = configs.model
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise gin_config.ConfigError(
            f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}"
        )
    peak = hardware.peak_flops()
    device = jax.devices()[0]
    out = {
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
        },
        "host_malloc": host_malloc.describe(),  # on CPU, up to a third of a step (host_malloc)
        "peak_flops": peak,
        "peak_source": "measured f32 matmul" if device.platform == "cpu" else "hardware.CHIPS",
    }
    runner = None
    if {"step", "dense", "pipeline", "checkpoint"} & set(variants):
        runner = step_bench.StepRunner(configs)
        # Switch and its dense twin alternate step by step: a shared machine's load then slows
        # both alike and their ratio stays meaningful.
        runners = [runner]
        if "dense" in variants and model_cfg.moe is not None:
            runners.append(step_bench.StepRunner(step_bench.dense_twin(configs)))
        seconds, cpu = step_bench.time_interleaved(runners, steps, warmup)
        out["step"] = step_bench.report(runner, seconds[0], peak, cpu[0])
        if len(runners) > 1:
            out["dense"] = step_bench.report(runners[1], seconds[1], peak, cpu[1])
            out["switch_over_dense_step_time"] = step_bench.ratio(seconds[0], seconds[1])
            out["switch_over_dense_cpu_time"] = step_bench.ratio(cpu[0], cpu[1])
            del runners[1]
    if "dispatches" in variants and model_cfg.moe is not None:
        names = dispatches or ["einsum", "scatter", "sorted", "dropless"]
        out["dispatches"] = _step_per_dispatch(configs, names, steps, warmup, peak)
    if "breakdown" in variants and model_cfg.moe is not None:
        from switch_jax.tools.benchmarks import breakdown  # noqa: PLC0415

        out["breakdown"] = breakdown.bench_breakdown(configs, max(steps, 1))
    if "dispatch" in variants and model_cfg.moe is not None:
        from switch_jax.tools.benchmarks import dispatch as dispatch_bench

        rows = dispatch_bench.bench_dispatch(model_cfg, **dispatch)
        out["dispatch"] = {
            "rows": rows,
            "cost_ratio_largest_vs_smallest_group": dispatch_bench.scaling(rows),
        }
    if {"pipeline", "checkpoint"} & set(variants):
        from switch_jax.tools.benchmarks import io

        if "pipeline" in variants:
            out["pipeline"] = io.bench_pipeline(runner, out["step"]["step_s"])
        if "checkpoint" in variants:
            out["checkpoint"] = io.bench_checkpoint(runner)
    return out


def _step_per_dispatch(configs, dispatches, steps, warmup, peak) -> dict:
    """Every dispatch's train step and the dense twin's, all in one interleaved loop (so all
    of them live in memory at once: one model per dispatch, plus the dense one)."""
    from switch_jax.tools.benchmarks import step as step_bench  # noqa: PLC0415

    runners = [step_bench.StepRunner(step_bench.dense_twin(configs))]
    runners += [step_bench.StepRunner(step_bench.with_dispatch(configs, d)) for d in dispatches]
    wall, cpu = step_bench.time_interleaved(runners, steps, warmup)
    dense = step_bench.report(runners[0], wall[0], peak, cpu[0])
    out = {}
    for i, name in enumerate(dispatches, start=1):
        out[name] = {
            "switch": step_bench.report(runners[i], wall[i], peak, cpu[i]),
            "dense": dense,
            "over_dense_wall": step_bench.ratio(wall[i], wall[0]),
            "over_dense_cpu": step_bench.ratio(cpu[i], cpu[0]),
        }
    return out


def format_table(r: dict) -> str:
    """Human-readable summary of run_benchmarks' result."""
    dev = r["device"]
    peak = f"peak {_g(r['peak_flops'])}FLOP/s ({r['peak_source']})"
    lines = [f"device {dev['kind']} x{dev['count']}, {peak}, {r['host_malloc']}"]
    for name in ("step", "dense"):
        s = r.get(name)
        if s:
            mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a"
            lines.append(
                f"{name:>6}: compile {_compile(s)}  "
                f"step {s['step_s'] * 1e3:.1f}ms "
                f"(spread {s['step']['spread']:.0%}, n={s['step']['n']})  "
                f"{s['tokens_per_s']:,.0f} tok/s  MFU {mfu}  "
                f"compiled {_g(s['compiled_bytes'])}B  max RSS {_g(s['process_max_rss_bytes'])}B"
            )
    if "switch_over_dense_step_time" in r:
        q = r["switch_over_dense_step_time"]
        lines.append(
            f"switch / dense step time at equal FLOPs: {q['paired_median']:.3f} (median of "
            f"step-paired ratios, range {q['paired_min']:.2f}-{q['paired_max']:.2f}; "
            f"of fastest steps {q['of_mins']:.3f})"
        )
    if "switch_over_dense_cpu_time" in r:
        q = r["switch_over_dense_cpu_time"]
        lines.append(f"switch / dense step CPU time: {q['paired_median']:.3f}")
    for name, d in r.get("dispatches", {}).items():
        sw, de = d["switch"], d["dense"]
        wall, cpu = d["over_dense_wall"]["paired_median"], d["over_dense_cpu"]["paired_median"]
        lines.append(
            f"dispatch {name:>8}: compile {_compile(sw)} (dense {_compile(de)})  "
            f"step {sw['step_s']:.3f}s vs {de['step_s']:.3f}s  switch/dense wall "
            f"{wall:.3f}  cpu {cpu:.3f}"
        )
    if "breakdown" in r:
        b = r["breakdown"]
        for name, piece in b.items():
            if isinstance(piece, dict):
                lines.append(
                    f"breakdown {name:>24} x{piece['count']}: switch {piece['switch_cpu_s']:.3f}s "
                    f"dense {piece['dense_cpu_s']:.3f}s CPU (wall {piece['switch_s']:.3f} / "
                    f"{piece['dense_s']:.3f})"
                )
        lines.append(
            f"breakdown predicts a step delta of {b['predicted_step_delta_cpu_s']:.2f}s CPU "
            f"({b['predicted_step_delta_s']:.2f}s wall)"
        )
    if "dispatch" in r:
        lines.append("MoE layer fwd+bwd, ns per token [x dense FFN] (dispatch E: T=...):")
        table: dict = {}
        for row in r["dispatch"]["rows"]:
            table.setdefault((row["dispatch"], row["experts"]), []).append(row)
        for (d, e), rows in table.items():
            cells = "  ".join(
                f"T{x['group_size']}={x['ns_per_token']:.0f} [{x['over_dense_ffn']:.2f}]"
                for x in rows
            )
            lines.append(f"  {d:>8} E{e:<3} {cells}")
    if "pipeline" in r:
        lines.append(f"pipeline: {json.dumps(r['pipeline'], default=_round)}")
    if "checkpoint" in r:
        c = r["checkpoint"]
        lines.append(
            f"checkpoint ({_g(c['state_bytes'])}B state): save() blocks "
            f"{c['save_call']['median_s'] * 1e3:.0f}ms, "
            f"steps after {c['step_s_after_save'] * 1e3:.1f}ms "
            f"vs {c['step_s_without_save'] * 1e3:.1f}ms, stall {c['stall_s'] * 1e3:.0f}ms/save, "
            f"commit {c['wait_for_commit']['median_s'] * 1e3:.0f}ms in background"
        )
    return "\n".join(lines)


def _compile(figures: dict) -> str:
    """'32.6s, 628 kernels'; '2.1s from the compile cache, 628 kernels' where it was a load."""
    cached = " from the compile cache" if figures.get("compile_from_cache") else ""
    k = figures.get("kernels")
    return f"{figures['compile_s']:.1f}s{cached}" + (f", {k['distinct']} kernels" if k else "")


def _g(x) -> str:
    if x is None:
        return "n/a "
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _round(x):
    return round(x, 4) if isinstance(x, float) else str(x)


def check_finite(tree, where="") -> None:
    """Raise naming the first NaN / inf in a results tree: a broken figure must not be published."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{where}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            check_finite(v, f"{where}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise RuntimeError(f"benchmark produced a non-finite value at {where}")
