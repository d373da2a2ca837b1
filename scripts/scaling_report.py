"""Tables and PNGs of a reproduce_scaling.py results.json (re-runnable alone).

python scripts/scaling_report.py --out=out/scaling_cpu     # writes summary.md and *.png there
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _final(run: dict) -> float:
    return run["curve"][-1]["val_loss"]


# At a constant learning rate the validation loss moves by a few hundredths between evaluations;
# the mean of the last TAIL evaluations is reported beside the final one.
TAIL = 3


def _tail(run: dict) -> float:
    return float(np.mean([p["val_loss"] for p in run["curve"][-TAIL:]]))


def steps_to_reach(curve: list[dict], target: float, key: str = "step") -> float | None:
    """First `key` value where the validation loss reaches `target` (linear interpolation)."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return float(point[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev[key] + frac * (point[key] - prev[key])
        prev = point
    return None


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "se": None, "n": 0, "min": None, "max": None}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {
        "mean": float(v.mean()),
        "std": std,
        "se": std / np.sqrt(len(v)),
        "n": len(v),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _experts(name: str) -> int:
    return 1 if name == "dense" else int(name.split("-")[1])


def summarise(results: dict) -> dict:
    """Per model: final loss over seeds; per Switch model: step / time speedup to dense quality.

    The speedup of seed s compares with the dense run of the same seed (same data order), i.e.
    steps of the dense model / steps of the Switch model to reach the dense model's final loss.
    """
    runs = results["runs"]
    dense = runs.get("dense", {})
    out = {}
    for name in sorted(runs, key=_experts):
        seeds = runs[name]
        row = {"final": _stats([_final(r) for r in seeds.values()]), "seeds": sorted(seeds)}
        row.update(_costs(seeds.values()))
        if name != "dense":
            step_up, time_up, gap, tail_gap = [], [], [], []
            for seed, run in seeds.items():
                if seed not in dense:
                    continue
                d = dense[seed]["curve"][-1]
                s = steps_to_reach(run["curve"], d["val_loss"])
                t = steps_to_reach(run["curve"], d["val_loss"], "train_s")
                step_up.append(d["step"] / s if s else None)
                time_up.append(d["train_s"] / t if t else None)
                gap.append(d["val_loss"] - _final(run))
                tail_gap.append(_tail(dense[seed]) - _tail(run))
            row.update(
                step_speedup=_stats(step_up),
                time_speedup=_stats(time_up),
                gain_over_dense=_stats(gap),
                tail_gain_over_dense=_stats(tail_gap),
                reached=sum(x is not None for x in step_up),
            )
        out[name] = row
    return {
        "models": out,
        "distill": _distill_summary(results),
        "upcycle": _upcycle_summary(results),
    }


def _upcycle_summary(results: dict) -> dict:
    """Upcycled Switch vs the same seed's dense run continued (and its Switch from scratch)."""
    runs, out = results["runs"], {}
    for name, seeds in results.get("upcycle", {}).items():
        dense, scratch = runs.get("dense", {}), runs.get(f"switch-{_experts(name)}", {})
        row = {k: [] for k in ("final", "gain", "vs_scratch", "initial", "at", "agree", "speedup")}
        for seed, run in seeds.items():
            at, final = run["upcycled_at"], _final(run)
            row["final"].append(final)
            row["initial"].append(run["initial_val_loss"])
            row["at"].append(run["dense_at"])
            if seed in scratch:
                row["vs_scratch"].append(_final(scratch[seed]) - final)
            if seed not in dense:
                continue
            d = dense[seed]["curve"]
            row["gain"].append(_final(dense[seed]) - final)
            # The re-trained dense state at `at` must be the scaling run's (same init, batches).
            row["agree"] += [abs(p["val_loss"] - run["dense_at"]) for p in d if p["step"] == at]
            reach = steps_to_reach(run["curve"], _final(dense[seed]))
            row["speedup"].append((d[-1]["step"] - at) / (reach - at) if reach else None)
        out[name] = {k: _stats(v) for k, v in row.items()}
        out[name]["upcycled_at"] = next(iter(seeds.values()))["upcycled_at"]
        out[name]["agree"]["max"] = max(row["agree"], default=None)
    return out


def _costs(records) -> dict:
    """Step time and router statistics over seeds (absent from results of older versions)."""
    records = list(records)

    def over(key, get=lambda r, k: r.get(k)):
        return _stats([get(r, key) for r in records])

    return {
        "step_ms": over("step_ms"),
        "dropped_first": over("fraction_dropped", lambda r, k: r["curve"][0].get(k)),
        "dropped_run": over("run_fraction_dropped"),
        "load_max": over("run_load_max"),
        "load_min": over("run_load_min"),
    }


def _distill_summary(results: dict) -> dict:
    """Fraction of the teacher's gain over the dense baseline that each student keeps."""
    runs, out = results["runs"], {}
    for variant, seeds in results.get("distill", {}).items():
        kept, tail_kept, finals = [], [], []
        for seed, run in seeds.items():
            teacher = runs.get(run["teacher"], {}).get(seed)
            dense = runs.get("dense", {}).get(seed)
            finals.append(_final(run))
            if teacher and dense:
                gain = _final(dense) - _final(teacher)
                kept.append((_final(dense) - _final(run)) / gain if gain > 0 else None)
                gain = _tail(dense) - _tail(teacher)
                tail_kept.append((_tail(dense) - _tail(run)) / gain if gain > 0 else None)
        out[variant] = {
            "final": _stats(finals),
            "kept": _stats(kept),
            "tail_kept": _stats(tail_kept),
        }
    return out


def _fmt(s: dict, digits: int = 3, pm: bool = True) -> str:
    if not s or s["mean"] is None:
        return "not reached"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if pm and s["n"] > 1 else "")


def _gain(s: dict) -> tuple[str, str]:
    """Paired gain as mean ± standard error, and the mean in units of that error."""
    if s["mean"] is None:
        return "-", "-"
    if s["n"] < 2:
        return f"{s['mean']:+.4f} (1 seed)", "-"
    ratio = f"{s['mean'] / s['se']:+.1f}" if s["se"] > 0 else "-"
    return f"{s['mean']:+.4f} ± {s['se']:.4f}", ratio


def _costs_table(summary: dict, results: dict) -> list[str]:
    tokens = results["args"].get("tokens") or {}
    per_run = _stats([t["target_tokens"] for t in tokens.values()])["mean"]
    per_run = f"{per_run:,.0f}" if per_run else "-"
    lines = [
        "",
        "| model | target tokens per run | step ms (mean over seeds) | dropped: first eval window "
        "/ whole run | busiest / idlest expert over the run (x even share) |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary["models"].items():
        pct = [row[k]["mean"] for k in ("dropped_first", "dropped_run")]
        dropped = " / ".join("-" if p is None else f"{100 * p:.1f} %" for p in pct)
        loads = [row[k]["mean"] for k in ("load_max", "load_min")]
        load = "-" if None in loads else f"{loads[0]:.2f} / {loads[1]:.2f}"
        ms = "-" if row["step_ms"]["mean"] is None else f"{row['step_ms']['mean']:.0f}"
        lines.append(f"| {name} | {per_run} | {ms} | {dropped} | {load} |")
    return lines


def _seeds_table(results: dict) -> list[str]:
    runs = results["runs"]
    names = sorted(runs, key=_experts)
    seeds = sorted({s for r in runs.values() for s in r}, key=int)
    lines = ["", "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed in seeds:
        cells = [f"{_final(runs[n][seed]):.4f}" if seed in runs[n] else "-" for n in names]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, results: dict) -> str:
    steps = results["args"]["steps"]
    lines = [
        f"| model | final val loss (mean ± std over seeds) | gain over dense (paired, mean ± "
        f"SE) | gain / SE | steps to dense final ({steps}) reached in | step speedup | "
        f"wall-clock speedup | gain on the mean of the last {TAIL} evaluations (± SE) | "
        "gain / SE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["models"].items():
        if name == "dense":
            lines.append(f"| dense | {_fmt(row['final'], 4)} | - | - | - | 1.00 | 1.00 | - | - |")
            continue
        gain, ratio = _gain(row["gain_over_dense"])
        tail, tail_ratio = _gain(row["tail_gain_over_dense"])
        lines.append(
            f"| {name} | {_fmt(row['final'], 4)} | {gain} | {ratio} | "
            f"{row['reached']}/{len(row['seeds'])} seeds | {_fmt(row['step_speedup'], 2)} | "
            f"{_fmt(row['time_speedup'], 2)} | {tail} | {tail_ratio} |"
        )
    lines += _seeds_table(results) + _costs_table(summary, results)
    if not summary["models"]:  # e.g. only --phases=upcycle in this --out
        lines = []
    if summary["distill"]:
        lines += [
            "",
            "| distillation run | final val loss | fraction of the teacher's gain kept | the same "
            f"on the mean of the last {TAIL} evaluations |",
            "|---|---|---|---|",
        ]
        for variant, row in summary["distill"].items():
            kept, seeds = row["kept"], row["final"]["n"]
            # Seeds whose teacher did not beat the dense baseline have no gain to keep.
            pct = (
                f"- (teacher not better than dense in any of {seeds} seeds)"
                if kept["mean"] is None
                else f"{100 * kept['mean']:.0f} %"
                + (f" ± {100 * kept['std']:.0f}" if kept["n"] > 1 else "")
                + f" ({kept['n']} of {seeds} seeds had a teacher better than dense)"
            )
            tail = row["tail_kept"]
            tail = (
                "-"
                if tail["mean"] is None
                else f"{100 * tail['mean']:.0f} %"
                + (f" ± {100 * tail['std']:.0f}" if tail["n"] > 1 else "")
            )
            lines.append(f"| {variant} | {_fmt(row['final'], 4)} | {pct} | {tail} |")
    for name, row in summary.get("upcycle", {}).items():
        at, experts = row["upcycled_at"], _experts(name)
        gain, ratio = _gain(row["gain"])
        scratch, _ = _gain(row["vs_scratch"])
        agree = row["agree"]["max"]
        lines += [
            "",
            f"| {name}, from dense step {at} | dense at step {at} | upcycled, before training | "
            f"final val loss | gain over dense continued (paired ± SE) | gain / SE | over "
            f"Switch-{experts} from scratch | extra steps to dense's final: speedup |",
            "|---|---|---|---|---|---|---|---|",
            f"| {row['final']['n']} seeds | {_fmt(row['at'], 4)} | {_fmt(row['initial'], 4)} | "
            f"{_fmt(row['final'], 4)} | {gain} | {ratio} | {scratch} | "
            f"{_fmt(row['speedup'], 2)} |",
            "",
            f"(the dense state it starts from, trained again, is the scaling run's: validation "
            f"loss at step {at} within "
            + ("-" if agree is None else f"{agree:.1e}")
            + " of that run's)",
        ]
    checks = results.get("checks") or {}
    if checks:
        lines += [
            "",
            "| check (same seed, batches) | final val loss | reference model | its loss |",
            "|---|---|---|---|",
        ]
        for name, seeds in checks.items():
            for seed, run in sorted(seeds.items()):
                ref = results["runs"].get(run["against"], {}).get(seed)
                ref_loss = f"{_final(ref):.4f}" if ref else "-"
                lines.append(
                    f"| {name} (seed {seed}) | {_final(run):.4f} | {run['against']} | {ref_loss} |"
                )
    return "\n".join(lines) + "\n"


def plot(summary: dict, results: dict, out: str) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs, paths = results["runs"], []
    # Distilled students join the curves (dashed): same seeds, same batches as the dense run.
    runs = {**runs, **{f"student: {v}": seeds for v, seeds in results.get("distill", {}).items()}}
    names = sorted(results["runs"], key=_experts) + sorted(set(runs) - set(results["runs"]))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {
        n: ("black" if n == "dense" else palette[i % len(palette)]) for i, n in enumerate(names)
    }

    def save(fig, fname):
        fig.tight_layout()
        paths.append(os.path.join(out, fname))
        fig.savefig(paths[-1])
        plt.close(fig)

    if not results["runs"]:  # e.g. only --phases=upcycle in this --out
        return [_plot_upcycle(results, out, plt)] if summary.get("upcycle") else []
    for key, label, fname in (
        ("step", "training step", "loss_vs_step.png"),
        ("train_s", "training seconds (shared 2-core CPU)", "loss_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
        lows, tops = [], []
        for name in names:
            curves = list(runs[name].values())
            n = min(len(c["curve"]) for c in curves)
            xs = np.mean([[p[key] for p in c["curve"][:n]] for c in curves], 0)
            ys = np.asarray([[p["val_loss"] for p in c["curve"][:n]] for c in curves])
            ax.plot(
                xs,
                ys.mean(0),
                label=f"{name} ({len(curves)} seeds)",
                color=colors[name],
                lw=2 if name == "dense" else 1.3,
                ls="--" if name.startswith("student") else "-",
            )
            ax.fill_between(xs, ys.min(0), ys.max(0), color=colors[name], alpha=0.15)
            lows.append(ys.min())
            tops.append(ys[:, min(1, n - 1)].max())  # zoom past the first, steep evaluation
        ax.set(
            xlabel=label,
            ylabel="validation cross-entropy (nats)",
            title="Dense vs Switch-E at equal FLOPs/token (band: seed min-max)",
        )
        ax.set_ylim(min(lows) - 0.03, max(tops) + 0.03)
        ax.legend(fontsize=8)
        save(fig, fname)

    rows = summary["models"]
    experts = [_experts(n) for n in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    means = [rows[n]["final"]["mean"] for n in rows]
    errs = [rows[n]["final"]["std"] for n in rows]
    ax1.errorbar(experts, means, yerr=errs, fmt="o-", capsize=3)
    ax1.set(
        xlabel="experts (1 = dense)",
        ylabel="final validation loss",
        title="Loss vs experts (± std over seeds)",
    )
    sw = [n for n in rows if n != "dense"]
    sp = [rows[n]["step_speedup"] for n in sw]
    ok = [i for i, s in enumerate(sp) if s["mean"] is not None]
    ax2.errorbar(
        [_experts(sw[i]) for i in ok],
        [sp[i]["mean"] for i in ok],
        yerr=[sp[i]["std"] for i in ok],
        fmt="o-",
        capsize=3,
        color="tab:green",
    )
    ax2.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax2.set(
        xlabel="experts",
        ylabel="step speedup to dense final loss",
        title="Step speedup vs experts (Fig. 4 / 5 style)",
    )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.minorticks_off()
    save(fig, "speedup.png")

    if summary["distill"]:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
        teacher = next(iter(results["distill"].values()))
        teacher = next(iter(teacher.values()))["teacher"]
        bars = [("dense", rows["dense"]["final"]), (teacher, rows[teacher]["final"])]
        bars += [(v, r["final"]) for v, r in summary["distill"].items()]
        ax.bar(
            range(len(bars)),
            [b[1]["mean"] for b in bars],
            yerr=[b[1]["std"] for b in bars],
            capsize=3,
            color=["black", "tab:blue"] + ["tab:orange"] * (len(bars) - 2),
        )
        for i, (variant, _) in enumerate(bars[2:], start=2):
            kept = summary["distill"][variant]["kept"]["mean"]
            if kept is not None:
                ax.text(
                    i,
                    bars[i][1]["mean"],
                    f"{100 * kept:.0f} % kept",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        lo = min(b[1]["mean"] for b in bars)
        hi = max(b[1]["mean"] for b in bars)
        ax.set_ylim(lo - (hi - lo) * 1.5 - 1e-3, hi + (hi - lo) * 0.8 + 1e-3)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set(ylabel="final validation loss", title="Distillation into the dense twin")
        save(fig, "distill.png")
    if summary.get("upcycle"):
        paths.append(_plot_upcycle(results, out, plt))
    return paths


def _mean_curve(seeds: dict, start: int = 0):
    curves = [[p for p in r["curve"] if p["step"] >= start] for r in seeds.values()]
    n = min(len(c) for c in curves)
    steps = [p["step"] for p in curves[0][:n]]
    return steps, np.mean([[p["val_loss"] for p in c[:n]] for c in curves], 0)


def _plot_upcycle(results: dict, out: str, plt) -> str:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    variants = results["upcycle"]
    first = next(iter(next(iter(variants.values())).values()))
    at, experts = first["upcycled_at"], first["experts"]
    for key, label, color in (
        ("dense", "dense (continued past the checkpoint)", "black"),
        (f"switch-{experts}", f"switch-{experts} from scratch", "tab:blue"),
    ):
        if key in results["runs"]:
            ax.plot(*_mean_curve(results["runs"][key], at), label=label, color=color)
    colors = ("tab:red", "tab:orange", "tab:green", "tab:purple")
    for i, (name, seeds) in enumerate(variants.items()):
        steps, loss = _mean_curve(seeds)
        color = colors[i % len(colors)]
        ax.plot(steps, loss, label=f"{name} from dense step {at}", color=color, marker="o", ms=3)
    ax.axvline(at, color="gray", ls=":", lw=0.8)
    seeds = min(len(v) for v in variants.values())
    ax.set(
        xlabel="training step",
        ylabel="validation cross-entropy (nats)",
        title=f"Sparse upcycling at equal FLOPs/token (mean of {seeds} seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "upcycle.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def report(results: dict, out: str, *, plots: bool = True) -> dict:
    summary = summarise(results)
    text = markdown(summary, results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text)
    if plots:
        print("plots:", ", ".join(plot(summary, results, out)))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="the --out of reproduce_scaling.py")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument(
        "--merge",
        default="",
        help="comma list of other --out directories whose phases ran apart (e.g. --phases=upcycle "
        "in a second process): their runs join this report",
    )
    args = p.parse_args()
    results = merged([args.out] + [d for d in args.merge.split(",") if d])
    report(results, args.out, plots=not args.no_plots)


SECTIONS = ("runs", "upcycle", "distill", "checks")


def merged(outs: list[str]) -> dict:
    """The first --out's results.json with every run of the others added (same settings)."""
    from reproduce_scaling import settings_differ  # noqa: PLC0415 (scripts/, next to this file)

    loaded = []
    for out in outs:
        with open(os.path.join(out, "results.json")) as f:
            loaded.append(json.load(f))
    results = loaded[0]
    for out, other in zip(outs[1:], loaded[1:], strict=True):
        differ = settings_differ(other["args"], results["args"])
        if differ:
            raise SystemExit(f"{out} has other settings than {outs[0]}: {', '.join(differ)}")
        for section in SECTIONS:
            for name, seeds in other.get(section, {}).items():
                results.setdefault(section, {}).setdefault(name, {}).update(seeds)
    return results


if __name__ == "__main__":
    main()
