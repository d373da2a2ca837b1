"""Ahead-of-time compilation of the real train step for a Cloud TPU topology, on a CPU host.

    report(configs, "v5p-64") -> dict            # what `python -m switch_jax.compile` prints
    topo = parse_topology("v5p-64")               # chips, usable HBM, get_topology_desc args
    partitioner = build.make_partitioner(configs, devices=topology_devices(topo))
    result = compile_train_step(configs, partitioner, hbm_bytes=topo.spec.hbm_bytes)

libtpu's `jax.experimental.topologies.get_topology_desc` gives compile-only devices of a slice (no
TPU needed); the run is build.build_run's on those devices, and its train step (`.jitted`) is
lowered inside the mesh activation with the abstract train state and a ShapeDtypeStruct batch
(steps.batch_shapes), so what compiles here is what trains there. Fake devices belong to several
"hosts", so nothing here computes host batch slices or touches data. Names follow Cloud TPU's
accelerator types: v4-N and v5p-N count TensorCores (2 per chip), v5e-N / v5litepod-N and v6e-N
count chips.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import jax

from switch_jax.config.settings import Configs
from switch_jax.models.config import ConfigError
from switch_jax.parallel import hlo, partitioning
from switch_jax.report import hardware
from switch_jax.tools import planner, roofline
from switch_jax.training import build, steps

GiB = 2**30
INSTALL_HINT = "pip install 'switch_jax[tpu]' (or: pip install 'libtpu==0.0.42.*' for jax 0.10)"


@dataclasses.dataclass(frozen=True)
class Generation:
    """How libtpu names the slices of one TPU generation; the chip itself is report/hardware's."""

    chip: hardware.Chip
    topology_prefix: str  # get_topology_desc's name: 'v5:2x4x4'
    chip_config: str  # 'megacore' (2 TensorCores as one device) or 'default'
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    cores_per_chip_in_name: int  # v4-64 is 32 chips

    @property
    def hbm_bytes(self) -> int:
        """What the compiler may use per chip."""
        return self.chip.hbm_bytes

    @property
    def peak_bf16_flops(self) -> float:
        """Dense bf16 FLOP/s per chip."""
        return self.chip.peak_bf16_flops


# The generations libtpu can give compile-only devices for, keyed by hardware.CHIPS names.
GENERATIONS = {
    "v4": Generation(hardware.by_name("v4"), "v4", "megacore", 3, 2),
    "v5p": Generation(hardware.by_name("v5p"), "v5", "megacore", 3, 2),
    "v5e": Generation(hardware.by_name("v5e"), "v5e", "default", 2, 1),
    "v6e": Generation(hardware.by_name("v6e"), "v6e", "default", 2, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. 'v5p-64'
    generation: str  # key of GENERATIONS
    chips: int
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def topology_name(self) -> str:
        return f"{self.spec.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chips < 4:
            return (1, 1, 1)
        if self.spec.dims == 2 and self.chips == 8:  # v5e-8 / v6e-8: one host of 8 chips
            return (2, 4, 1)
        return (2, 2, 1)

    @property
    def devices(self) -> int:
        return self.chips * self.num_slices


def _torus(chips: int, dims: int) -> tuple[int, ...] | None:
    """Cloud TPU's slice shapes for a power-of-two chip count: v4/v5p 2x2x1, 2x2x2, 2x2x4,
    2x4x4, 4x4x4, ...; v5e/v6e 1x1, 2x2, 2x4, 4x4, 4x8, ..."""
    if dims == 3:
        if chips == 4:
            return (2, 2, 1)
        shape, axis = [2, 2, 2], 2
    else:
        if chips == 1:
            return (1, 1)
        shape, axis = [2, 2], 1
    while math.prod(shape) < chips:
        shape[axis] *= 2
        axis = (axis - 1) % dims
    return tuple(shape) if math.prod(shape) == chips else None


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-64', 'v4-8', 'v5e-16', 'v5litepod-256', 'v6e-8' -> Topology (ConfigError if not)."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    chip = hardware.by_name(match.group(1)) if match else None
    gen = chip.name if chip else None
    if gen not in GENERATIONS:
        raise ConfigError(
            f"--topology={name!r} must look like v4-N, v5p-N, v5e-N (v5litepod-N) or v6e-N"
        )
    spec = GENERATIONS[gen]
    count = int(match.group(2))
    chips = count // spec.cores_per_chip_in_name
    shape = _torus(chips, spec.dims) if count % spec.cores_per_chip_in_name == 0 else None
    if shape is None:
        sizes = "8, 16, 32, ..." if spec.dims == 3 else "1, 4, 8, 16, ..."
        raise ConfigError(f"--topology={name!r}: sizes {sizes} (powers of two) are known")
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be >= 1")
    return Topology(name, gen, chips, shape, num_slices)


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of the slice(s), from libtpu (raises ConfigError if missing)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(f"compiling for TPU needs libtpu: {INSTALL_HINT}") from None
    # libtpu takes a lock meant for real chips; a compile-only client must not wait on (or
    # block) another process that has it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology_name,
        chip_config_name=topo.spec.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=topo.num_slices,
    )
    return list(desc.devices)


class DoesNotFitError(Exception):
    """The step needs more HBM per chip than the topology has (one line: what to change)."""


@dataclasses.dataclass
class CompileResult:
    plan: planner.Plan  # .run: build_run's Run on the topology's devices
    compile_s: float
    memory: dict  # bytes per chip: arguments, outputs, aliased, temporaries, code, total
    cost: dict  # flops, bytes accessed (per chip, one step)
    collectives: dict  # kind -> {"count", "bytes"} (result bytes per chip, one step)
    input_state_bytes: planner.StateBytes  # from the compiled executable's input shardings


def advice(kind: str) -> str:
    if kind == "state":
        return (
            "spread the state: a larger expert or model axis in MESH_SHAPE, "
            "--gin.PARTITION_RULES=fsdp, or a bigger slice"
        )
    return (
        "cut activations: --gin.MICROBATCHES=k, a smaller --gin.BATCH_SIZE, more chips on the "
        "data/expert axes of MESH_SHAPE, or --gin.PARTITION_RULES=fsdp"
    )


def check_state_fits(plan: planner.Plan, batch_bytes: int, hbm_bytes: int, where: str) -> None:
    """Refuse before compiling when the arguments alone (state + batch) exceed the HBM."""
    need = plan.memory.state_bytes_per_device + batch_bytes
    if need > hbm_bytes:
        raise DoesNotFitError(
            f"does not fit {where}: the train state and batch alone need "
            f"{need / GiB:.2f} GiB per chip, {(need - hbm_bytes) / GiB:.2f} GiB more than its "
            f"{hbm_bytes / GiB:.2f} GiB of HBM; {advice('state')}"
        )


def compile_train_step(
    configs: Configs,
    partitioner: partitioning.Partitioner,
    *,
    hbm_bytes: int,
    where: str = "the topology",
    log: Callable[[str], None] = lambda line: None,
    target: str = "",
) -> CompileResult:
    """build_run on `partitioner`'s (compile-only) devices, then compile its train step; `log`
    gets a line naming `target` before the compile (minutes on a CPU host), its time after.

    Raises:
      DoesNotFitError: one line naming the shortfall and what to change.
      ConfigError: the model or batch does not split over the mesh (the trainer's checks).
    """
    plan = planner.plan(configs, partitioner)
    run = plan.run
    batch = steps.batch_shapes(
        run.model_cfg, configs.data.batch_size, run.lengths, partitioner.batch_sharding
    )
    check_state_fits(plan, sum(planner.shard_bytes(x) for x in batch.values()), hbm_bytes, where)
    abstract_state = run.setup.abstract_state
    # A persistent compilation cache cannot reload a compile-only executable (it warns, then
    # compiles again), so none is written.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with partitioner.activate():
            log(f"compiling the train step for {target or where}... minutes on a CPU host")
            t0 = time.perf_counter()
            # A distillation run's step also takes its teacher's params (abstract here).
            inputs = run.setup.abstract_inputs
            compiled = run.setup.train_step.jitted.lower(abstract_state, batch, *inputs).compile()
            compile_s = time.perf_counter() - t0
            log(f"compiled in {compile_s:.0f} s")
    except jax.errors.JaxRuntimeError as e:
        raise _not_fit(e, where) from None
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    # The compiler refuses what does not fit (its check uses the heap peak, which can be below
    # the sum reported as "total"); what compiled fits.
    memory = memory_per_chip(compiled)
    # None: an argument jit pruned as unused (Adafactor's placeholder [.., 1] statistics); it
    # stays on the device as planned.
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s or a.sharding),
        abstract_state,
        compiled.input_shardings[0][0],
        is_leaf=lambda x: x is None,
    )
    return CompileResult(
        plan,
        compile_s,
        memory,
        cost_per_chip(compiled),
        hlo.collectives(compiled.as_text()),
        planner.state_bytes(state_in),
    )


def _not_fit(e: Exception, where: str) -> Exception:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
        return e
    line = next((ln for ln in text.splitlines() if "exceeds available HBM" in ln), "")
    found = re.search(
        r"required for (.+?) \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", line
    )
    if found:
        what, need, have = found.groups()
        detail = f"{what} need {need} per chip, more than the {have} of HBM"
    else:
        detail = text.strip().splitlines()[0][:200]
    return DoesNotFitError(f"does not fit {where}: {detail}; {advice('activations')}")


def memory_per_chip(compiled) -> dict:
    """The compiler's per-chip bytes; donated outputs alias their arguments (counted once)."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
        "peak": getattr(m, "peak_memory_in_bytes", 0),
    }
    buffers = out["arguments"] + out["outputs"] - out["aliased"]
    if not out["temporaries"] and out["peak"] > buffers:
        # Some generations (v4, v5e, v6e in libtpu 0.0.42) leave temp_size at 0 and report
        # the heap peak only: what the peak holds beyond the live buffers is temporaries.
        out["temporaries"] = out["peak"] - buffers
    out["total"] = buffers + out["temporaries"] + out["code"]
    return out


def cost_per_chip(compiled) -> dict:
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    out = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
    if cost.get("optimal_seconds", -1) > 0:  # the TPU compiler's own estimate; -1 when it has none
        out["xla_optimal_s"] = float(cost["optimal_seconds"])
    return out


# --- the report of switch_jax.compile -------------------------------------------------------


def report(
    configs: Configs,
    topology: str,
    num_slices: int = 1,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """Compile the run of `configs` for `topology`; the figures as one JSON-able dict. `log` gets
    progress lines (libtpu loading, compile start and time) as they happen.

    Raises:
      DoesNotFitError: one line naming the shortfall and what to change.
    """
    topo = parse_topology(topology, num_slices)
    target = f"{topo.name} ({topo.devices} chip{'s' if topo.devices > 1 else ''}" + (
        f" in {num_slices} slices)" if num_slices > 1 else ")"
    )
    log(f"loading libtpu for {target}: without a TPU it warns about worker hostnames; expected")
    partitioner = build.make_partitioner(configs, devices=topology_devices(topo))
    mesh = tuple(partitioner.mesh.shape.values())
    batch_size, rules = configs.data.batch_size, configs.train.partition_rules
    where = f"{topo.name} with MESH_SHAPE={mesh}, BATCH_SIZE={batch_size}"
    where += f", MICROBATCHES={configs.optimizer.microbatches}, PARTITION_RULES={rules!r}"
    r = compile_train_step(
        configs, partitioner, hbm_bytes=topo.spec.hbm_bytes, where=where, log=log, target=target
    )
    run = r.plan.run
    model_flops = 3 * run.info.flops_per_sequence * batch_size
    sizes = {"chips": topo.devices, "num_slices": topo.num_slices, "model_flops": model_flops}
    estimate = roofline.estimate(r.cost, r.collectives, topo.spec.chip, **sizes)
    return {
        "topology": topo.name,
        "device_kind": partitioner.mesh.devices.flat[0].device_kind,
        "chips": topo.devices,
        "num_slices": topo.num_slices,
        "mesh_shape": list(mesh),
        "partition_rules": rules,
        "batch_size": batch_size,
        "lengths": list(run.lengths),
        "microbatches": configs.optimizer.microbatches,
        "total_params": run.info.total_params,
        "compile_s": r.compile_s,
        "hbm_bytes_per_chip": topo.spec.hbm_bytes,
        "memory_per_chip": r.memory,
        "hbm_fraction": r.memory["total"] / topo.spec.hbm_bytes,
        "planned_state_per_chip": _state(r.plan.memory),
        "compiled_state_per_chip": _state(r.input_state_bytes),
        "flops_per_chip": r.cost["flops"],
        "bytes_accessed_per_chip": r.cost["bytes"],
        "model_train_flops_per_step": model_flops,
        "step_s_at_peak": r.cost["flops"] / topo.spec.peak_bf16_flops,
        "xla_optimal_s": r.cost.get("xla_optimal_s"),
        "collectives_per_chip": {k: v for k, v in r.collectives.items() if k != "loop_trips"},
        # XLA's cost analysis counts a while loop's body once: with scan_layers (or microbatches)
        # the FLOPs and bytes above are those of one pass through each loop.
        "loop_trips": r.collectives["loop_trips"],
        "roofline": estimate,
    }


def _state(s: planner.StateBytes) -> dict:
    return {
        "params": s.param_bytes_per_device,
        "optimizer": s.optimizer_bytes_per_device,
        "other": s.other_bytes_per_device,
    }


def format_report(r: dict) -> str:
    """Human-readable lines of `report`."""
    gib = planner.gib
    m, s = r["memory_per_chip"], r["planned_state_per_chip"]
    same = "the same" if s == r["compiled_state_per_chip"] else "DIFFERS from the compiled inputs"
    d, e, mo = r["mesh_shape"]
    inputs, targets = r["lengths"]
    collectives = "; ".join(
        f"{kind} {c['count']} x, {gib(c['bytes'])}"
        for kind, c in r["collectives_per_chip"].items()
        if c["count"]
    )
    return "\n".join(
        [
            f"compiled       train step for {r['topology']} ({r['chips']} chips, "
            f"{r['device_kind']}) in {r['compile_s']:.0f} s",
            f"mesh           data {d} x expert {e} x model {mo}, rules "
            f"'{r['partition_rules']}'; batch {r['batch_size']} x (inputs {inputs}, targets "
            f"{targets}), microbatches {r['microbatches']}; {r['total_params']:,} parameters",
            f"HBM per chip   {gib(m['total'])} of {gib(r['hbm_bytes_per_chip'])} "
            f"({r['hbm_fraction']:.0%}): arguments {gib(m['arguments'])}, outputs "
            f"{gib(m['outputs'])} (aliased {gib(m['aliased'])}), temporaries "
            f"{gib(m['temporaries'])}, code {gib(m['code'])}; heap peak {gib(m['peak'])}",
            f"state per chip parameters {gib(s['params'])} + Adafactor {gib(s['optimizer'])} "
            f"(planner: {same})",
            f"per step       {r['flops_per_chip'] / 1e12:.3g} TFLOP and "
            f"{r['bytes_accessed_per_chip'] / 1e9:.3g} GB accessed per chip (cost analysis); "
            f">= {r['step_s_at_peak'] * 1e3:.3g} ms at the chip's bf16 peak"
            + (
                f" (loop bodies counted once; loops run {r['loop_trips']} times)"
                if any(n > 1 for n in r.get("loop_trips", ()))
                else ""
            ),
            f"collectives    {collectives or 'none'} (per chip and step, result sizes)",
            roofline.format_estimate(r["roofline"]),
        ]
    )
