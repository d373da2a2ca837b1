"""PNGs of a run from its metrics.jsonl files (`switch-plot` is the command).

    plot_run(model_dir, out_dir=None) -> [paths]

Reads MODEL_DIR/train/metrics.jsonl and MODEL_DIR/eval/metrics.jsonl (what the trainer writes)
and writes into MODEL_DIR/plots (or out_dir):

  loss.png          cross-entropy (train, eval) on a log axis; below it, what the loss adds:
                    the load-balancing, z- and router z-losses
  learning_rate.png the schedule as logged
  throughput.png    tokens/s and MFU (the first logged step, which includes compilation, is left
                    out)
  expert_load.png   one heatmap per MoE layer: each expert's share of tokens over steps, as a
                    multiple of an even share (1.0 = balanced; 0 = an idle expert)
  moe_health.png    per MoE layer: fraction of token assignments dropped (over capacity), router
                    confidence (mean top-k probability) and the load-balancing loss

Needs matplotlib (`pip install switch_jax[plot]`). Works on a run in progress.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from switch_jax.store import model_dir as model_dir_lib

_LAYER = re.compile(r"^moe/(encoder|decoder)/layer_(\d+)/expert_fraction$")


class PlotError(RuntimeError):
    """Nothing to plot (no metrics) or matplotlib missing; the message says what to do."""


def read_rows(path: str) -> list[dict]:
    """Rows of a metrics.jsonl, one per step (the last row wins), sorted by step.

    Raises:
      PlotError: a line that parses but is not an object with an integer 'step' (not a
        metrics file); a line cut short by a crash or a run in progress is skipped.
    """
    if not os.path.exists(path):
        return []
    rows: dict[int, dict] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise PlotError(
                    f"{path} line {number}: not a metrics row (a JSON object with an integer "
                    "'step'); is this the trainer's metrics.jsonl?"
                )
            rows[step] = row
    return [rows[s] for s in sorted(rows)]


def _has_metrics(model_dir: str) -> bool:
    return any(os.path.exists(model_dir_lib.metrics_file(model_dir, k)) for k in ("train", "eval"))


def series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have `key`."""
    kept = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not kept:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*kept, strict=True)
    return np.asarray(steps), np.asarray(values, np.float64)


def moe_layers(rows: Sequence[dict]) -> list[str]:
    """'encoder/layer_1', 'decoder/layer_1', ... in stack then layer order."""
    found = {m.groups() for r in rows for k in r if (m := _LAYER.match(k))}
    order = {"encoder": 0, "decoder": 1}
    return [f"{s}/layer_{i}" for s, i in sorted(found, key=lambda x: (order[x[0]], int(x[1])))]


def load_matrix(rows: Sequence[dict], layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, load_ES): each expert's token share x the number of experts, per logged step."""
    key = f"moe/{layer}/expert_fraction"
    kept = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), list)]
    steps = np.asarray([s for s, _ in kept])
    fractions_SE = np.asarray([f for _, f in kept], np.float64)
    return steps, (fractions_SE * fractions_SE.shape[1]).T


def plot_run(model_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs of the run in `model_dir`; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'switch_jax[plot]'") from None
    train = read_rows(os.fspath(model_dir_lib.metrics_file(model_dir, "train")))
    evals = read_rows(os.fspath(model_dir_lib.metrics_file(model_dir, "eval")))
    if not os.path.isdir(model_dir):
        near = model_dir_lib.near_run(model_dir, holds=_has_metrics)
        raise PlotError(f"MODEL_DIR={model_dir} is not a directory{near}")
    if not train and not evals:
        raise PlotError(f"MODEL_DIR={model_dir} has no train/ or eval/ metrics.jsonl to plot")
    out_dir = out_dir or os.path.join(model_dir, model_dir_lib.PLOTS_DIR)  # as typed
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PlotError(f"--out={out_dir} is a file, not a folder; give a folder for the PNGs")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PlotError(f"--out={out_dir} cannot be created: {e.strerror or e}") from None
    title = os.path.basename(os.path.normpath(model_dir))
    figures = {
        "loss.png": _loss(plt, train, evals),
        "learning_rate.png": _learning_rate(plt, train),
        "throughput.png": _throughput(plt, train),
    }
    layers = moe_layers(train)
    if layers:
        figures["expert_load.png"] = _expert_load(plt, train, layers)
        figures["moe_health.png"] = _moe_health(plt, train, evals, layers)
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.suptitle(f"{title}: {fig._switch_title}", fontsize=11)  # noqa: SLF001
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _figure(plt, title: str, *args, **kwargs):
    fig, axes = plt.subplots(*args, **kwargs)
    fig._switch_title = title  # noqa: SLF001  (the suptitle, set with the run's name)
    return fig, axes


# What the train step adds to the cross-entropy, as logged (already scaled by their coefficients).
_LOSS_TERMS = (
    ("aux_loss", "load-balancing loss"),
    ("z_loss", "z-loss"),
    ("router_z_loss", "router z-loss"),
)


def _loss(plt, train, evals):
    """Cross-entropy above, on a log axis so that the step-1 spike (~ln V) leaves the rest
    readable; below, what the loss adds to it: ~100x smaller, it would otherwise draw the loss
    on top of the cross-entropy."""
    main = "cross_entropy" if any("cross_entropy" in r for r in train + evals) else "loss"
    fig, (top, bottom) = _figure(
        plt, "loss", 2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": (2, 1)}
    )
    for rows, label, style in ((train, "train", {"lw": 1.2}), (evals, "eval", {"marker": "o"})):
        steps, values = series(rows, main)
        if len(steps):
            top.plot(steps, values, label=label, **style)
    top.set_ylabel(("cross-entropy" if main == "cross_entropy" else "loss") + "\n(nats per token)")
    _log_axis(top)
    top.legend()
    for i, (key, label) in enumerate(_LOSS_TERMS):
        _term_line(bottom, train, key, f"train {label}", color=f"C{i + 2}", lw=1)
        _term_line(bottom, evals, key, f"eval {label}", color=f"C{i + 2}", marker="o", lw=0)
    if main == "cross_entropy":  # the sum of the terms, or a distillation mix's own difference
        steps, loss = series(train, "loss")
        ce = dict(zip(*series(train, "cross_entropy"), strict=True))
        kept = [(s, v - ce[s]) for s, v in zip(steps, loss, strict=True) if s in ce]
        if kept:
            bottom.plot(*zip(*kept, strict=True), "k--", lw=0.8, label="train loss − cross-entropy")
    bottom.set_ylabel("added to the loss")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    if bottom.lines:
        top_value = max(float(np.max(line.get_ydata())) for line in bottom.lines)
        bottom.set_ylim(0, 1.7 * top_value if top_value > 0 else 1)  # room for the legend
        bottom.legend(fontsize=7, ncol=2, loc="upper right")
    return fig


def _term_line(ax, rows, key: str, label: str, **style) -> None:
    steps, values = series(rows, key)
    if np.any(values != 0):  # a term that is off (coefficient 0) only clutters the legend
        ax.plot(steps, values, label=label, **style)


def _log_axis(ax) -> None:
    from matplotlib.ticker import ScalarFormatter

    ax.set_yscale("log")
    # Plain numbers on every tick: a range under a decade would otherwise read 6x10^0.
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        axis_formatter(formatter)
    ax.grid(alpha=0.3, which="both")


def _learning_rate(plt, train):
    steps, lr = series(train, "learning_rate")
    if not len(steps):
        return None
    fig, ax = _figure(plt, "learning rate", figsize=(7, 3))
    ax.plot(steps, lr)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return fig


def _throughput(plt, train):
    rows = train[1:] if train and train[0]["step"] <= 1 else train  # step 1 includes compiling
    steps, tokens = series(rows, "tokens_per_s")
    if not len(steps):
        return None
    fig, ax = _figure(plt, "throughput (after compilation)", figsize=(7, 3.5))
    ax.plot(steps, tokens, color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    mfu_steps, mfu = series(rows, "mfu")
    if len(mfu_steps) == len(steps) and np.all(tokens > 0):
        # MFU is tokens/s times a constant of the run: one line, a second scale on the right.
        ratio = float(np.median(100 * mfu / tokens))
        right = ax.secondary_yaxis("right", functions=(lambda t: t * ratio, lambda m: m / ratio))
        right.set_ylabel("MFU %")
    return fig


def _expert_load(plt, train, layers):
    from matplotlib.colors import TwoSlopeNorm

    mats = [load_matrix(train, layer) for layer in layers]
    vmax = max(2.0, max(float(m.max()) for _, m in mats if m.size))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    fig, axes = _figure(
        plt, "expert load (x even share)", len(layers), 1, figsize=(8, 1.0 + 1.6 * len(layers))
    )
    axes = np.atleast_1d(axes)
    for ax, layer, (steps, load_ES) in zip(axes, layers, mats, strict=True):
        image = ax.pcolormesh(
            _edges(steps), np.arange(load_ES.shape[0] + 1) - 0.5, load_ES, cmap="RdBu_r", norm=norm
        )
        ax.invert_yaxis()  # expert 0 on top
        ax.set_ylabel(f"{layer}\nexpert", fontsize=8)
        ax.set_yticks(range(load_ES.shape[0]) if load_ES.shape[0] <= 16 else [])
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("step")
    fig.colorbar(image, ax=list(axes), label="tokens / even share", shrink=0.9)
    return fig


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around logged steps (which need not be evenly spaced: 1, 10, 20, ...)."""
    steps = np.asarray(steps, np.float64)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def _moe_health(plt, train, evals, layers):
    fig, axes = _figure(plt, "router health per MoE layer", 3, 1, figsize=(7, 7.5), sharex=True)
    panels = (
        ("fraction_dropped", "dropped (over capacity)", 100.0, "%"),
        ("router_confidence", "router confidence\n(mean top-k prob.)", 1.0, ""),
        ("aux_loss", "load-balancing loss\n(1.0 = balanced)", 1.0, ""),
    )
    for ax, (field, label, scale, unit) in zip(axes, panels, strict=True):
        for i, layer in enumerate(layers):
            steps, values = series(train, f"moe/{layer}/{field}")
            ax.plot(steps, scale * values, color=f"C{i}", lw=1, label=f"{layer} train")
            steps, values = series(evals, f"moe/{layer}/{field}")
            if len(steps):
                ax.plot(steps, scale * values, "o", color=f"C{i}", ms=4, label=f"{layer} eval")
        ax.set_ylabel(label + (f" {unit}" if unit else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("step")
    return fig
