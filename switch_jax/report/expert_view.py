"""What each expert of a MoE layer sees: load, drops, confidence, tokens, positions (NumPy only).

    counts = {name: LayerCounts(num_experts, vocab_size, token_choice=...) for name in layers}
    for batch in batches:                       # tools/expert_capture.capture_routing
        for name, routing in batch.items():
            counts[name].add(routing)
    report = build_report(counts, token_names, dead_threshold=0.1, min_count=5)
    print(format_table(report)); write_json(report, path)

A pick is *routed* to an expert when the router chose it (token choice: before capacity; expert
choice: the expert took the token), *kept* when the expert processed it, *dropped* when routed
but over capacity. Lift = P(token | routed to e) / P(token among the layer's real tokens): 1 for
an expert that takes a fair sample of the text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import numpy as np

DEFAULT_BUCKETS = 4
TOP_TOKENS = 8  # per expert, in the JSON (the table shows fewer)
HEATMAP_TOKENS_PER_EXPERT = 3
HEATMAP_MAX_ROWS = 32


@dataclasses.dataclass
class LayerCounts:
    """Running sums of one MoE layer over the batches it is given (`add`)."""

    num_experts: int
    vocab_size: int
    token_choice: bool = True  # False: expert choice (pick e = expert e, kept = taken)
    buckets: int = DEFAULT_BUCKETS
    length: int = 0  # the stack's sequence length, set by the first batch
    real_tokens: int = 0
    skipped_tokens: int = 0  # real tokens no expert processed (every pick dropped / untaken)
    routed_E: np.ndarray = None
    kept_E: np.ndarray = None
    gate_sum_E: np.ndarray = None
    tokens_EV: np.ndarray = None
    corpus_V: np.ndarray = None
    bucket_EK: np.ndarray = None
    bucket_K: np.ndarray = None

    def __post_init__(self):
        E, V, K = self.num_experts, self.vocab_size, self.buckets
        zeros = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
        self.routed_E, self.kept_E, self.gate_sum_E = zeros(E), zeros(E), np.zeros(E)
        self.tokens_EV, self.corpus_V = zeros(E, V), zeros(V)
        self.bucket_EK, self.bucket_K = zeros(E, K), zeros(K)

    def add(self, r) -> None:
        """Count one batch: `r` has expert_BLP, kept_BLP, gate_BLP, tokens_BL, real_BL,
        positions_BL (tools/expert_capture.LayerRouting)."""
        E, V, K = self.num_experts, self.vocab_size, self.buckets
        self.length = self.length or r.tokens_BL.shape[1]
        real_BLP = np.broadcast_to(r.real_BL[..., None], r.expert_BLP.shape)
        kept_BLP = r.kept_BLP & real_BLP
        routed_BLP = real_BLP if self.token_choice else kept_BLP
        expert = r.expert_BLP[routed_BLP].astype(np.int64)
        tokens = np.broadcast_to(r.tokens_BL[..., None], r.expert_BLP.shape)[routed_BLP]
        bucket_BL = position_bucket(r.positions_BL, self.length, K)
        bucket = np.broadcast_to(bucket_BL[..., None], r.expert_BLP.shape)[routed_BLP]

        self.routed_E += np.bincount(expert, minlength=E)
        self.kept_E += np.bincount(r.expert_BLP[kept_BLP], minlength=E)
        self.gate_sum_E += np.bincount(
            r.expert_BLP[kept_BLP], weights=r.gate_BLP[kept_BLP], minlength=E
        )
        self.tokens_EV += np.bincount(expert * V + tokens, minlength=E * V).reshape(E, V)
        self.corpus_V += np.bincount(r.tokens_BL[r.real_BL], minlength=V)
        self.bucket_EK += np.bincount(expert * K + bucket, minlength=E * K).reshape(E, K)
        self.bucket_K += np.bincount(bucket_BL[r.real_BL], minlength=K)
        self.real_tokens += int(r.real_BL.sum())
        self.skipped_tokens += int((r.real_BL & ~kept_BLP.any(-1)).sum())


def position_bucket(positions: np.ndarray, length: int, buckets: int) -> np.ndarray:
    """Equal-width bucket of each position in [0, length)."""
    return np.minimum(np.asarray(positions, np.int64) * buckets // max(length, 1), buckets - 1)


def bucket_labels(length: int, buckets: int) -> list[str]:
    """'0-31', '32-63', ...: the positions each bucket holds."""
    of = position_bucket(np.arange(length), length, buckets)
    spans = [np.flatnonzero(of == k) for k in range(buckets)]
    return [f"{s[0]}-{s[-1]}" if len(s) else "-" for s in spans]


def lift_EV(c: LayerCounts) -> np.ndarray:
    """P(token | expert) / P(token in the layer's text); 0 where either is unseen."""
    p_token_given_e = c.tokens_EV / np.maximum(c.routed_E, 1)[:, None]
    p_token = c.corpus_V / max(int(c.corpus_V.sum()), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_token > 0, p_token_given_e / p_token, 0.0)


def build_report(
    counts: Mapping[str, LayerCounts],
    token_names: Mapping[str, Callable[[int], str]],
    *,
    dead_threshold: float = 0.1,
    min_count: int = 5,
) -> dict:
    """The JSON-ready report of every layer in `counts` (see the module docstring).

    Args:
      counts: layer name ('encoder/layer_1') -> its counts.
      token_names: layer name -> (token id -> readable piece).
      dead_threshold: an expert whose share is below this fraction of an even share is dead.
      min_count: a token needs this many picks of an expert to be listed for it (rare tokens
        would otherwise top every lift list).
    """
    layers = [_layer(name, c, token_names[name], min_count) for name, c in counts.items()]
    dead = [
        {"layer": layer["name"], "expert": x["expert"], "share": x["share"], "load": x["load"]}
        for layer in layers
        for x in layer["experts"]
        if x["load"] < dead_threshold
    ]
    return {
        "dead_threshold": dead_threshold,
        "min_count": min_count,
        "layers": layers,
        "dead_experts": dead,
    }


def _layer(name: str, c: LayerCounts, token_name, min_count: int) -> dict:
    E = c.num_experts
    routed = max(int(c.routed_E.sum()), 1)
    lift = lift_EV(c)
    experts = []
    for e in range(E):
        listed = np.flatnonzero(c.tokens_EV[e] >= min_count)
        by_count = listed[np.argsort(-c.tokens_EV[e, listed], kind="stable")][:TOP_TOKENS]
        by_lift = _by_lift(c, lift, e, listed)[:TOP_TOKENS]
        row = lambda ids, e=e: [_token(c, lift, e, int(t), token_name) for t in ids]  # noqa: E731
        share = int(c.routed_E[e]) / routed
        experts.append(
            {
                "expert": e,
                "routed": int(c.routed_E[e]),
                "share": share,
                "load": share * E,
                "kept": int(c.kept_E[e]),
                "dropped": int(c.routed_E[e] - c.kept_E[e]),
                "confidence": float(c.gate_sum_E[e] / c.kept_E[e]) if c.kept_E[e] else None,
                "position_share": _shares(c.bucket_EK[e]),
                "top_tokens": row(by_count),
                "distinctive_tokens": row(by_lift),
            }
        )
    return {
        "name": name,
        "routing": "token_choice" if c.token_choice else "expert_choice",
        "tokens": c.real_tokens,
        "picks": int(c.routed_E.sum()),
        "dropped": int((c.routed_E - c.kept_E).sum()),
        "skipped_tokens": c.skipped_tokens,
        "position_buckets": bucket_labels(c.length, c.buckets),
        "position_share": _shares(c.bucket_K),
        "experts": experts,
        "token_expert_share": _heatmap(c, lift, token_name, min_count),
    }


def _by_lift(c: LayerCounts, lift, e: int, ids: np.ndarray) -> np.ndarray:
    """`ids` by descending lift, ties by descending count: under top-1 every token an expert
    alone takes has the same lift (1 / its share), and the frequent ones say more."""
    return ids[np.lexsort((-c.tokens_EV[e, ids], -lift[e, ids]))]


def _token(c: LayerCounts, lift, e: int, t: int, token_name) -> dict:
    return {"id": t, "token": token_name(t), "count": int(c.tokens_EV[e, t]), "lift": lift[e, t]}


def _shares(counts: np.ndarray) -> list[float]:
    return (counts / max(int(counts.sum()), 1)).tolist()


def _heatmap(c: LayerCounts, lift, token_name, min_count: int) -> dict:
    """P(expert | token) for each expert's most distinctive tokens: rows sorted by the expert
    that takes them most, so that specialised experts show as blocks on the diagonal."""
    rows: list[int] = []
    for e in range(c.num_experts):
        listed = np.flatnonzero(c.tokens_EV[e] >= min_count)
        best = _by_lift(c, lift, e, listed)
        rows += [int(t) for t in best[:HEATMAP_TOKENS_PER_EXPERT] if t not in rows]
    rows = rows[:HEATMAP_MAX_ROWS]
    picks_VE = c.tokens_EV[:, rows].T.astype(np.float64)
    share = picks_VE / np.maximum(picks_VE.sum(1, keepdims=True), 1)
    order = sorted(range(len(rows)), key=lambda i: (int(np.argmax(share[i])), -share[i].max()))
    return {
        "tokens": [token_name(rows[i]) for i in order],
        "counts": [int(picks_VE[i].sum()) for i in order],
        "share": [share[i].tolist() for i in order],
    }


# ----------------------------------------------------------------------------- output


def format_table(report: dict, *, tokens_shown: int = 4) -> str:
    """The report as a fixed-width table, one block per layer, the dead experts last."""
    lines = []
    for layer in report["layers"]:
        lines += _layer_lines(layer, tokens_shown)
    dead = report["dead_experts"]
    limit = f"load < {report['dead_threshold']:g}x an even share"
    if dead:
        named = ", ".join(f"{d['layer']} #{d['expert']} ({100 * d['share']:.2f}%)" for d in dead)
        lines.append(f"dead experts ({limit}): {named}")
    else:
        lines.append(f"dead experts ({limit}): none")
    return "\n".join(lines)


def _layer_lines(layer: dict, tokens_shown: int) -> list[str]:
    dropped = layer["dropped"] / max(layer["picks"], 1)
    head = (
        f"{layer['name']} ({layer['routing']}): {layer['tokens']:,} tokens, "
        f"{100 * dropped:.1f}% of picks dropped, {layer['skipped_tokens']:,} tokens unprocessed"
    )
    buckets = layer["position_buckets"]
    width = max(7, *(len(b) + 1 for b in buckets))
    columns = "expert   share   load  dropped  conf " + "".join(f"{b:>{width}}" for b in buckets)
    lines = [head, "  " + columns + "   (share of each position bucket)"]
    corpus = "".join(f"{100 * s:>{width - 1}.0f}%" for s in layer["position_share"])
    lines.append("  " + "all".rjust(6) + " " * 30 + corpus)
    for x in layer["experts"]:
        conf = "-" if x["confidence"] is None else f"{x['confidence']:.2f}"
        dropped = x["dropped"] / max(x["routed"], 1)
        pos = "".join(f"{100 * s:>{width - 1}.0f}%" for s in x["position_share"])
        lines.append(
            f"  {x['expert']:>6} {100 * x['share']:6.2f}% {x['load']:5.2f}x {100 * dropped:7.1f}% "
            f"{conf:>5} {pos}"
        )
        lines.append("         frequent    " + _tokens(x["top_tokens"][:tokens_shown]))
        lines.append("         distinctive " + _tokens(x["distinctive_tokens"][:tokens_shown]))
    return lines


def _tokens(tokens: list[dict]) -> str:
    if not tokens:
        return "(no token picked often enough)"
    return "  ".join(f"{t['token']!r} {t['lift']:.1f}x ({t['count']})" for t in tokens)


def write_json(report: dict, path: str) -> str:
    """Write `report` to `path` (its folder created); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
        f.write("\n")
    return path
