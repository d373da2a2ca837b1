"""Collectives in an optimised HLO module's text: how many run per step and how many bytes.

Counts what XLA emits after SPMD partitioning (per chip): all-to-all, all-gather,
reduce-scatter, all-reduce, collective-permute; for async pairs the '-done' op; ops inside a
while loop (scan over microbatches or layers) count as many times as it runs: its
known_trip_count, or the constant bound its condition compares the loop index with.
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
# A computation's header starts at column 0 (its instructions are indented).
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+).*?body=%?([\w.\-]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BOUND = re.compile(r"s32\[\][^ ]* constant\((\d+)\)")


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _ITEM_BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} per chip and step: the result bytes of each collective (for
    async pairs, of the '-done' op), times the trip counts of the while loops around it; and
    "loop_trips", the trip count of every while loop (the compiler's cost analysis counts each
    loop body once)."""
    lines: dict[str, list[str]] = {}  # computation -> its instructions
    ops: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, bytes)]
    loops: dict[str, tuple[str, str, str]] = {}  # body -> (condition, enclosing comp, line)
    current = ""
    for line in hlo_text.splitlines():
        comp = _COMPUTATION.match(line)
        if comp:
            current = comp.group(1)
            continue
        lines.setdefault(current, []).append(line)
        loop = _WHILE.search(line)
        if loop:
            loops[loop.group(2)] = (loop.group(1), current, line)
        op = _OP.match(line)
        if op and op.group("phase") != "-start":
            ops.setdefault(current, []).append((op.group("op"), _type_bytes(op.group("type"))))

    def trips(body: str) -> int:
        condition, _, line = loops[body]
        known = _KNOWN_TRIPS.search(line)
        if known:
            return int(known.group(1))
        # jax's scan / fori loops count an s32 index from 0 while it is < a constant bound (the
        # TPU compiler's HLO carries no known_trip_count).
        text = "\n".join(lines.get(condition, []))
        bound = _BOUND.search(text)
        return int(bound.group(1)) if bound and "direction=LT" in text else 1

    def runs(comp: str, depth: int = 0) -> int:  # loops nest: microbatch scan > layer scan
        if comp not in loops or depth > 16:
            return 1
        return trips(comp) * runs(loops[comp][1], depth + 1)

    out: dict = {"loop_trips": sorted(trips(body) for body in loops)}
    out.update({kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES})
    for comp, found in ops.items():
        n = runs(comp)
        for kind, size in found:
            out[kind]["count"] += n
            out[kind]["bytes"] += n * size
    return out
