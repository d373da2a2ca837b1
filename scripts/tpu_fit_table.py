"""Which paper configs fit which Cloud TPU slices at the paper's batch: the table in docs/tpu.md.

    python scripts/tpu_fit_table.py run [ROW ...] [--timeout=2400]   # compile rows, one at a time
    python scripts/tpu_fit_table.py table                            # markdown from the results
    python scripts/tpu_fit_table.py plan                             # train state per device

`plan` runs `python -m switch_jax.info ... --json` (no compile, no libtpu) for PLAN_ROWS and prints
the train state per device. `run` calls `python -m switch_jax.compile ... --json` for each row
(under `nice -n 5`, one compile at a time: a full-size compile takes minutes and ~8 GB of host RAM)
and appends what it printed to docs/tpu_fit.jsonl: the JSON report, or the one-line "does not fit"
message. `table` renders every row, saying which have no measurement yet, with the step-time
estimate of switch_jax/tools/roofline.py: the record's own when it has one, else computed from
its stored cost analysis and collectives (records from before the estimator). Every row uses
runs/pretrain.gin: batch 2048 x 512 inputs / 114 targets (2^20 input tokens), Adafactor, float32
parameters.
Needs libtpu (pip install 'switch_jax[tpu]').
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "tpu_fit.jsonl"
GiB = 2**30

SCAN = "ModelConfig.scan_layers=True"  # one compiled layer per stack: minutes, not tens
# id: (model, gin file, topology, MESH_SHAPE, extra gin bindings). Order = priority.
ROWS = {
    "sb128-v5p64": ("Switch-Base-128", "switch_base_128", "v5p-64", (1, 32, 1), (SCAN,)),
    "t5b-v5p32": ("T5-Base", "t5_base", "v5p-32", (16, 1, 1), (SCAN,)),
    "t5b-v5p16": ("T5-Base", "t5_base", "v5p-16", (8, 1, 1), (SCAN,)),
    "t5b-v5p16-mb2": ("T5-Base", "t5_base", "v5p-16", (8, 1, 1), (SCAN, "MICROBATCHES=2")),
    "sxxl-v5p8": ("Switch-XXL-128", "switch_xxl", "v5p-8", (1, 4, 1), ()),
    "sb128-v4-64": ("Switch-Base-128", "switch_base_128", "v4-64", (1, 32, 1), (SCAN,)),
    "sb128-v5p16": ("Switch-Base-128", "switch_base_128", "v5p-16", (1, 8, 1), (SCAN,)),
    "sb128-v5p64-unrolled": ("Switch-Base-128", "switch_base_128", "v5p-64", (1, 32, 1), ()),
    "sl128-v5p128": ("Switch-Large-128", "switch_large", "v5p-128", (1, 64, 1), (SCAN,)),
    "t5l-v5p64": ("T5-Large", "t5_large", "v5p-64", (32, 1, 1), (SCAN,)),
    "t5xxl-v5p256": (
        "T5-XXL",
        "t5_xxl",
        "v5p-256",
        (16, 1, 8),
        ("PARTITION_RULES='fsdp'", SCAN),
    ),
    "sxxl-v5p1024": (
        "Switch-XXL-128",
        "switch_xxl",
        "v5p-1024",
        (4, 128, 1),
        ("PARTITION_RULES='fsdp'", SCAN),
    ),
    "sc2048-v5p4096": ("Switch-C-2048", "switch_c", "v5p-4096", (1, 2048, 1), (SCAN,)),
}


# (model, gin file, MESH_SHAPE, PARTITION_RULES) for the planner table (docs/sharding.md).
PLAN_ROWS = [
    ("Switch-Base-128", "switch_base_128", (1, 8, 1), "default"),
    ("Switch-Base-128", "switch_base_128", (1, 32, 1), "default"),
    ("Switch-Large-128", "switch_large", (1, 64, 1), "default"),
    ("Switch-XXL-128", "switch_xxl", (4, 128, 1), "fsdp"),
    ("Switch-XXL-128", "switch_xxl", (1, 128, 8), "default"),
    ("Switch-C-2048", "switch_c", (1, 2048, 1), "default"),
    ("T5-Base", "t5_base", (16, 1, 1), "default"),
    ("T5-Large", "t5_large", (32, 1, 1), "default"),
    ("T5-XXL", "t5_xxl", (16, 1, 8), "fsdp"),
]


def plan_row(gin: str, mesh: tuple, rules: str) -> dict:
    cmd = [sys.executable, "-m", "switch_jax.info", f"--gin_file=models/{gin}.gin"]
    cmd += ["--gin_file=runs/pretrain.gin", f"--gin.MESH_SHAPE={mesh}"]
    cmd += [f"--gin.PARTITION_RULES='{rules}'", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_table(reports: list[dict]) -> str:
    lines = [
        "| model | MESH_SHAPE | rules | parameters | per device: params | Adafactor | state |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, _, mesh, rules), r in zip(PLAN_ROWS, reports, strict=True):
        lines.append(
            f"| {model} | `{mesh}` | {rules} | {r['total_params'] / 1e9:.1f}B "
            f"| {r['param_bytes_per_device'] / GiB:.2f} GiB "
            f"| {r['optimizer_bytes_per_device'] / 2**20:.1f} MiB "
            f"| {r['state_bytes_per_device'] / GiB:.2f} GiB |"
        )
    return "\n".join(lines)


def command(row: str) -> list[str]:
    _, gin, topology, mesh, extra = ROWS[row]
    return [
        sys.executable,
        "-m",
        "switch_jax.compile",
        f"--gin_file=models/{gin}.gin",
        "--gin_file=runs/pretrain.gin",
        f"--topology={topology}",
        f"--gin.MESH_SHAPE={mesh}",
        *(f"--gin.{b}" for b in extra),
        "--json",
    ]


def run_row(row: str, timeout: int) -> dict:
    t0 = time.time()
    cmd = ["nice", "-n", "5", *command(row)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"row": row, "outcome": "timeout", "wall_s": time.time() - t0}
    record = {"row": row, "wall_s": time.time() - t0, "command": " ".join(command(row)[1:])}
    last = (out.stderr.strip().splitlines() or [""])[-1]
    if out.returncode == 0:
        record.update(outcome="fits", report=json.loads(out.stdout.strip().splitlines()[-1]))
    elif last.startswith("DoesNotFitError:"):
        record.update(outcome="does not fit", message=last.split(":", 1)[1].strip())
    else:
        record.update(outcome="error", message=last, returncode=out.returncode)
    return record


def latest() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {r["row"]: r for r in records}


def estimate(row: str, record: dict) -> dict:
    """The roofline of a fitting record: its own, or computed from what it stored."""
    from switch_jax.report import hardware
    from switch_jax.tools import aot, roofline

    rep = record["report"]
    if "roofline" in rep:
        return rep["roofline"]
    collectives = dict(rep["collectives_per_chip"])
    if "all_to_all_per_step" in record:  # the hand-corrected count of an early record
        collectives["all-to-all"] = record["all_to_all_per_step"]
    # Records from before compile kept loop trips: a scanned stack is a loop that runs more
    # than once, which is all the estimate needs to know.
    scanned = SCAN in ROWS[row][4]
    collectives["loop_trips"] = rep.get("loop_trips") or ([2] if scanned else [])
    topo = aot.parse_topology(rep["topology"], rep["num_slices"])
    cost = {"flops": rep["flops_per_chip"], "bytes": rep["bytes_accessed_per_chip"]}
    chip = hardware.by_name(topo.generation)
    return roofline.estimate(
        cost,
        collectives,
        chip,
        chips=rep["chips"],
        num_slices=rep["num_slices"],
        model_flops=rep["model_train_flops_per_step"],
    )


def compute_floor_cell(row: str) -> str:
    """For a row not compiled yet: the compute term alone, from the planner's model FLOPs (the
    HBM and ICI terms need the compiled program)."""
    from switch_jax.report import hardware
    from switch_jax.tools import aot

    _, gin, topology, mesh, extra = ROWS[row]
    cmd = [sys.executable, "-m", "switch_jax.info", f"--gin_file=models/{gin}.gin"]
    cmd += ["--gin_file=runs/pretrain.gin", f"--gin.MESH_SHAPE={mesh}"]
    cmd += [*(f"--gin.{b}" for b in extra), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    topo = aot.parse_topology(topology)
    flops = info["train_flops_per_sequence"] * info["batch_size"] / topo.chips
    seconds = flops / hardware.by_name(topo.generation).peak_bf16_flops
    return f"compute alone >= {seconds * 1e3:.0f} ms (not compiled: HBM, ICI unknown)"


def estimate_cell(e: dict) -> str:
    t = e["terms_s"]
    terms = ", ".join(
        f"{name} {t[key] * 1e3:.3g}" if t[key] is not None else f"{name} unknown"
        for name, key in (("compute", "compute"), ("HBM", "hbm"), ("ICI", "ici"))
    )
    return f">= {e['step_s'] * 1e3:.0f} ms, {e['bound']}-bound, MFU <= {e['mfu']:.0%} ({terms} ms)"


def table() -> str:
    head = (
        "| model | slice (chips) | MESH_SHAPE | fits | HBM per chip, GiB (args + temps) "
        "| all-to-all per chip and step | compile | step estimate |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    results = latest()
    for row, (model, _, topology, mesh, extra) in ROWS.items():
        notes = ["fsdp" for b in extra if "fsdp" in b] + ["scan" for b in extra if b == SCAN]
        notes += [f"microbatches {b.split('=')[1]}" for b in extra if b.startswith("MICRO")]
        mesh_text = f"`{mesh}`" + "".join(f" {n}" for n in notes)
        r = results.get(row)
        if r is None:
            cells = ["not measured yet", "", "", "", compute_floor_cell(row)]
        elif r["outcome"] == "fits":
            rep = r["report"]
            m, a2a = rep["memory_per_chip"], rep["collectives_per_chip"]["all-to-all"]
            a2a = r.get("all_to_all_per_step", a2a)  # a hand-corrected count, see its record
            hbm = rep["hbm_bytes_per_chip"] / GiB
            cells = [
                "yes",  # the compiler accepted it
                f"{m['total'] / GiB:.1f} of {hbm:.2f} ({m['arguments'] / GiB:.1f} + "
                f"{m['temporaries'] / GiB:.1f}; heap peak {m['peak'] / GiB:.1f})",
                (f"{a2a['bytes'] / GiB:.2f} GiB in {a2a['count']}" if a2a["count"] else "none")
                + (" (derived)" if "derived" in a2a else ""),
                f"{rep['compile_s'] / 60:.1f} min",
                estimate_cell(estimate(row, r)),
            ]
        elif r["outcome"] == "does not fit":
            why = r["message"].split(";")[0].split(": ", 1)[-1]  # what, not where (columns)
            cells = ["**no**: " + why, "", "", "", ""]
        else:
            cells = [f"{r['outcome']}: {r.get('message', '')}", "", "", "", ""]
        chips = topology_chips(topology)
        cells = [model, f"{topology} ({chips})", mesh_text, *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def topology_chips(name: str) -> int:
    from switch_jax.tools.aot import parse_topology

    return parse_topology(name).chips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "table", "plan"])
    parser.add_argument("rows", nargs="*", help=f"row ids (default: all): {', '.join(ROWS)}")
    parser.add_argument("--timeout", type=int, default=2400, help="seconds per compile")
    args = parser.parse_args()
    if args.action == "table":
        print(table())
        return
    if args.action == "plan":
        print(plan_table([plan_row(gin, mesh, rules) for _, gin, mesh, rules in PLAN_ROWS]))
        return
    for row in args.rows or list(ROWS):
        if row not in ROWS:
            parser.error(f"unknown row {row!r}; known: {', '.join(ROWS)}")
        record = run_row(row, args.timeout)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(row, record["outcome"], f"{record['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
