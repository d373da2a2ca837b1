"""PNGs of an experts report (report/expert_view.py): per MoE layer, a token-by-expert heatmap
and a load bar chart. Drawn from the report's JSON alone, so a stored step_N.json redraws."""

from __future__ import annotations

import os

import numpy as np


class PlotError(Exception):
    """matplotlib is missing; the message says what to install."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'switch_jax[plot]'") from None
    return plt


def plot_report(report: dict, out_dir: str, prefix: str) -> list[str]:
    """Write `{prefix}_{layer}_tokens.png` and `..._load.png` per layer; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    title = report.get("title", "")
    written = []
    for layer in report["layers"]:
        stem = os.path.join(out_dir, f"{prefix}_{layer['name'].replace('/', '_')}")
        for suffix, draw in (("tokens", _heatmap), ("load", _load)):
            fig = draw(plt, layer, report)
            fig.suptitle(f"{title} {layer['name']}".strip(), fontsize=11)
            path = f"{stem}_{suffix}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def _heatmap(plt, layer: dict, report: dict):
    grid = layer["token_expert_share"]
    share_TE = np.asarray(grid["share"], np.float64).reshape(len(grid["tokens"]), -1)
    E = len(layer["experts"])
    rows = max(len(grid["tokens"]), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 0.42 * E, 1.2 + 0.26 * rows))
    if not grid["tokens"]:
        ax.text(0.5, 0.5, f"no token was picked {report['min_count']}+ times", ha="center")
        ax.set_axis_off()
        return fig
    image = ax.imshow(share_TE, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    labels = [f"{t!r} ({n})" for t, n in zip(grid["tokens"], grid["counts"], strict=True)]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(
        "each row: where a token's picks go (rows: experts' highest-lift tokens)", fontsize=8
    )
    fig.colorbar(image, ax=ax, label="P(expert | token)", shrink=0.8)
    return fig


def _load(plt, layer: dict, report: dict):
    experts = layer["experts"]
    E = len(experts)
    kept = np.array([x["kept"] for x in experts], np.float64)
    dropped = np.array([x["dropped"] for x in experts], np.float64)
    even = max(kept.sum() + dropped.sum(), 1.0) / E  # the picks an expert gets when balanced
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * E + 2), 3.2))
    x = np.arange(E)
    ax.bar(x, kept / even, color="tab:blue", label="processed")
    ax.bar(x, dropped / even, bottom=kept / even, color="tab:red", label="dropped (over capacity)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="even share")
    dead = report["dead_threshold"]
    ax.axhline(dead, color="tab:gray", lw=0.8, ls=":", label=f"dead below {dead:g}x")
    for e in x[(kept + dropped) / even < dead]:
        ax.annotate("dead", (e, dead), ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_xticks(x if E <= 32 else x[:: max(E // 16, 1)])
    ax.set_xlabel("expert")
    ax.set_ylabel("picks / even share")
    top = float(((kept + dropped) / even).max())
    ax.set_ylim(0, max(1.3, top) * 1.4)  # headroom: the legend sits above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return fig
