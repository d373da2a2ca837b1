"""Collectives in an optimised HLO module's text: how many run per step, their bytes and groups.

Counts what XLA emits after SPMD partitioning (per chip): all-to-all, all-gather,
reduce-scatter, all-reduce, collective-permute; for async pairs the '-done' op (its group from
the '-start'). The TPU compiler writes some reduce-scatters as a fusion calling a computation
named 'all-reduce-scatter' (an all-reduce, then each chip's slice): counted as a reduce-scatter
of that slice. Multi-slice programs send cross-slice (DCN) traffic as host transfers of the
megascale runtime: their `send`s are the "dcn" entry. An op runs as often as its computation:
a while body as often as its loop runs (known_trip_count, or the constant bound its condition
compares the loop index with), nested loops and fusions called from a loop body included.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2}
_ITEM_BYTES.update({"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<phase>-start|-done)?\((?P<operand>[^),]*)"
)
# A send's type is (data, context, token): the data array is its first element.
_SEND = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\((?P<data>[a-z]+\d*\[[\d,]*\]).*?\ssend\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
# A computation's header starts at column 0 (its instructions are indented).
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+).*?body=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BOUND = re.compile(r"s32\[\][^ ]* constant\((\d+)\)")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\})")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
# XLA's named form: the device mesh, then the axes each group spans.
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _ITEM_BYTES.get(dtype, 4)
    return total


def group_size(line: str) -> int | None:
    """Chips in each replica group of a collective's line; None for every chip (`{}` or none
    given); 2 for a collective-permute (one sender, one receiver)."""
    if "source_target_pairs=" in line:
        return 2
    listed = _GROUPS_LIST.search(line)
    if listed:
        return len([d for d in listed.group(1).strip("{}").split(",") if d])
    iota = _GROUPS_IOTA.search(line)  # [groups, size]<=[devices]...: XLA's compact form
    if iota:
        return int(iota.group(2))
    named = _GROUPS_MESH.search(line)  # mesh['axis_0'=1,'axis_1'=4] {'axis_1'}
    if named:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", named.group(2)))
    return None


class _Module:
    """The computations of an HLO module and how often each runs per step."""

    def __init__(self, hlo_text: str):
        self.lines: dict[str, list[str]] = {}
        self.callers: dict[str, list[tuple[str, str]]] = {}  # callee -> [(caller, while line)]
        self.loops: dict[str, str] = {}  # while body -> its condition
        self.entry = ""
        current = ""
        for line in hlo_text.splitlines():
            comp = _COMPUTATION.match(line)
            if comp:
                current = comp.group(2)
                self.entry = current if comp.group(1) else self.entry
                continue
            self.lines.setdefault(current, []).append(line)
            loop = _WHILE.search(line)
            if loop:
                self.loops[loop.group(2)] = loop.group(1)
                self.callers.setdefault(loop.group(2), []).append((current, line))
            called = _CALLS.findall(line)
            branches = _BRANCHES.search(line)
            if branches:
                called += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            for callee in called:
                self.callers.setdefault(callee, []).append((current, ""))
        self._runs: dict[str, int] = {}

    def trips(self, body: str, while_line: str) -> int:
        known = _KNOWN_TRIPS.search(while_line)
        if known:
            return int(known.group(1))
        # jax's scan / fori loops count an s32 index from 0 while it is < a constant bound (the
        # TPU compiler's HLO carries no known_trip_count).
        text = "\n".join(self.lines.get(self.loops[body], []))
        bound = _BOUND.search(text)
        return int(bound.group(1)) if bound and "direction=LT" in text else 1

    def runs(self, comp: str, depth: int = 0) -> int:
        """Times `comp` runs per step: the sum over its call sites of the caller's runs (times
        the trip count where it is a while body). Computations nothing calls run once."""
        if comp == self.entry or comp not in self.callers or depth > 32:
            return 1
        if comp not in self._runs:
            total = 0
            for caller, while_line in self.callers[comp]:
                trips = self.trips(comp, while_line) if while_line else 1
                total += trips * self.runs(caller, depth + 1)
            self._runs[comp] = total
        return self._runs[comp]

    def loop_trips(self) -> list[int]:
        return sorted(
            self.trips(body, line) for body in self.loops for _, line in self.callers[body][:1]
        )


def collectives(hlo_text: str) -> dict:
    """Per chip and step, {kind: {"count", "bytes", "by_group"}}: the result bytes of each
    collective (for async pairs, of the '-done' op) times the runs of its computation, and those
    bytes by replica-group size ("all": every chip); "dcn": the megascale sends (cross-slice
    traffic), with "reduce_bytes" those that are all-reduces; and "loop_trips", the trip count of
    every while loop (the compiler's cost analysis counts each loop body once)."""
    module = _Module(hlo_text)
    out: dict = {"loop_trips": module.loop_trips()}
    out.update({kind: {"count": 0, "bytes": 0, "by_group": {}} for kind in COLLECTIVES})
    out["dcn"] = {"count": 0, "bytes": 0, "reduce_bytes": 0}
    for comp, lines in module.lines.items():
        n = module.runs(comp)
        started: dict[str, int | None] = {}  # '-start' op -> its group size
        for line in lines:
            send = _SEND.match(line)
            if send and "xla_megascale_runtime" in line:
                size = n * _type_bytes(send.group("data"))
                out["dcn"]["count"] += n
                out["dcn"]["bytes"] += size
                out["dcn"]["reduce_bytes"] += size if "megascale_reduce_operation" in line else 0
                continue
            op = _OP.match(line)
            if not op:
                continue
            if op.group("phase") == "-start":
                started[_NAME.match(line).group(1)] = group_size(line)
                continue
            kind, size = op.group("op"), _type_bytes(op.group("type"))
            if op.group("phase") == "-done":
                group = started.get(op.group("operand").strip().lstrip("%"))
            else:
                group = group_size(line)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind, size = "reduce-scatter", size // (group or 1)
            entry = out[kind]
            entry["count"] += n
            entry["bytes"] += n * size
            key = str(group) if group else "all"
            entry["by_group"][key] = entry["by_group"].get(key, 0) + n * size
    return out
