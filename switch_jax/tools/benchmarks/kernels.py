"""How many distinct kernels a compiled program holds: the figure its compile time follows.

XLA fuses a program into kernels (HLO fusions), and the same fusion repeated with the same shapes
costs its compile once: on the 2-core CPU, eight identical layers compiled in 2.2x the time of one
and eight layers of different widths in 7x (docs/benchmarks.md §11). So the count of distinct
fusions, unlike the compile seconds, is the same on every run and explains a compile-time ratio.

Two fusions are the same kernel when their fused computations match up to the names of their
values and their metadata: the same kind, operations, wiring, shapes and layouts, and the same
computations called inside (a reduction's `to_apply`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_FUSION = re.compile(r"\bfusion\(.*\bkind=(\w+), calls=%([\w.\-]+)")
_CALLED = re.compile(r"\b(calls|to_apply)=%([\w.\-]+)")  # what a fused body calls
_METADATA = re.compile(r",? metadata=\{[^}]*\}")
_NAME = re.compile(r"%[\w.\-]+")


@dataclasses.dataclass(frozen=True)
class KernelCount:
    fusions: int  # fusion instructions in the optimized program
    distinct: int  # of them, different kernels


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Body lines of every computation in an HLO module's text, by name."""
    bodies: dict[str, list[str]] = {}
    name, lines = None, []
    for line in hlo_text.splitlines():
        header = None if line.startswith(" ") else _HEADER.match(line)
        if header:
            name, lines = header.group(1), []
        elif line == "}" and name is not None:
            bodies[name] = lines
            name = None
        elif name is not None:
            lines.append(line)
    return bodies


def count_kernels(hlo_text: str) -> KernelCount:
    """Fusions in `hlo_text` (a compiled executable's `as_text()`) and how many are distinct."""
    bodies = computations(hlo_text)
    digests: dict[str, str] = {}

    def digest(name: str) -> str:
        if name not in digests:
            digests[name] = ""  # a computation never calls itself; guards a malformed text
            text = "\n".join(_normal(line) for line in bodies.get(name, []))
            # What a body calls is named by its own digest: two reductions differ by reducer.
            text = _CALLED.sub(lambda m: f"{m.group(1)}={digest(m.group(2))}", text)
            # Values are named by their order of appearance: the wiring counts, names do not.
            order: dict[str, str] = {}
            text = _NAME.sub(lambda m: order.setdefault(m.group(0), f"%{len(order)}"), text)
            digests[name] = hashlib.sha1(text.encode()).hexdigest()
        return digests[name]

    fusions = [m for m in map(_FUSION.search, hlo_text.splitlines()) if m]
    kinds = {(m.group(1), digest(m.group(2))) for m in fusions}
    return KernelCount(fusions=len(fusions), distinct=len(kinds))


def _normal(line: str) -> str:
    line = _METADATA.sub("", line).strip()
    return line.removeprefix("ROOT ")


def of_compiled(compiled) -> KernelCount | None:
    """count_kernels of a `jax.stages.Compiled`; None where the backend gives no HLO text."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001  (not every backend returns its optimized module)
        return None
    return count_kernels(text) if text else None
