"""Collectives in an optimised HLO module's text: how many run per step and how many bytes.

Counts what XLA emits after SPMD partitioning (per chip): all-to-all, all-gather,
reduce-scatter, all-reduce, collective-permute; for async pairs the '-done' op; ops inside a
while loop with a known trip count (scan over microbatches or layers) count that many times.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2}
_ITEM_BYTES.update({"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<phase>-start|-done)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"while\(.*body=%?([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _ITEM_BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} per chip and step: the result bytes of each collective (for
    async pairs, of the '-done' op), times the trip count of the while loops around it."""
    ops: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, bytes)]
    trips: dict[str, tuple[int, str]] = {}  # while body -> (known trip count, enclosing comp)
    current = ""
    for line in hlo_text.splitlines():
        comp = _COMPUTATION.match(line)
        if comp and "=" not in line.split("{")[0]:
            current = comp.group(1)
            continue
        loop = _WHILE.search(line)
        if loop:
            trips[loop.group(1)] = (int(loop.group(2)), current)
        op = _OP.match(line)
        if op and op.group("phase") != "-start":
            ops.setdefault(current, []).append((op.group("op"), _type_bytes(op.group("type"))))

    def runs(comp: str, depth: int = 0) -> int:  # loops nest: microbatch scan > layer scan
        if comp not in trips or depth > 16:
            return 1
        n, parent = trips[comp]
        return n * runs(parent, depth + 1)

    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for comp, found in ops.items():
        n = runs(comp)
        for kind, size in found:
            out[kind]["count"] += n
            out[kind]["bytes"] += n * size
    return out
