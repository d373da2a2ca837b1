"""PNGs of a run from its metrics.jsonl files (`switch-plot` is the command).

    plot_run(model_dir, out_dir=None) -> [paths]

Reads MODEL_DIR/train/metrics.jsonl and MODEL_DIR/eval/metrics.jsonl (what the trainer writes)
and writes into MODEL_DIR/plots (or out_dir):

  loss.png          train loss and cross-entropy, eval loss and cross-entropy
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


def _loss(plt, train, evals):
    fig, ax = _figure(plt, "loss", figsize=(7, 4))
    for rows, key, label, style in (
        (train, "loss", "train loss", dict(lw=1.2)),
        (train, "cross_entropy", "train cross-entropy", dict(lw=0.8, alpha=0.7)),
        (evals, "loss", "eval loss", dict(marker="o", lw=1.5)),
        (evals, "cross_entropy", "eval cross-entropy", dict(marker="s", lw=0.8, ls="--")),
    ):
        steps, values = series(rows, key)
        if len(steps):
            ax.plot(steps, values, label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


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
