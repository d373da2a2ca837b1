"""Sizing a run without devices: parameters, FLOPs and per-device bytes of its train state.

    r = report(configs, num_devices=None)   # what `switch-info` prints (format_report(r))
    p = plan(configs, partitioner)          # the Run and its abstract state, for tools/aot.py

The train state sized here is the one training builds (steps.abstract_train_state: parameters,
Adafactor statistics, step and noise key, each with its NamedSharding), on a
jax.sharding.AbstractMesh of MESH_SHAPE (x DCN_MESH_SHAPE): no device is needed. A leaf's bytes
on a device are its shard's shape (each dimension divided by the mesh axes its sharding names,
rounded up as XLA pads) times its item size. The model and batch are checked against the mesh
with the trainer's own checks (Partitioner.adapt_model_config), so a run info accepts is one the
trainer accepts. Gradients add the parameter bytes again at run time; activations and XLA's
temporaries come on top (tools/aot.py measures those for a TPU topology).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import jax

from switch_jax.config import gin_config
from switch_jax.config.settings import Configs, TrainConfig
from switch_jax.parallel import partitioning
from switch_jax.report import hardware
from switch_jax.training import build, steps


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of a train state: per device (the most any one device holds) and in total."""

    param_bytes_per_device: int
    optimizer_bytes_per_device: int  # Adafactor second-moment statistics (no momentum)
    other_bytes_per_device: int  # step counter and noise key (replicated)
    param_bytes_total: int
    optimizer_bytes_total: int

    @property
    def state_bytes_per_device(self) -> int:
        return (
            self.param_bytes_per_device
            + self.optimizer_bytes_per_device
            + (self.other_bytes_per_device)
        )


def shard_bytes(x: jax.ShapeDtypeStruct | jax.Array) -> int:
    """Bytes of the largest shard of `x` under its NamedSharding (uneven splits round up)."""
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    mesh = x.sharding.mesh.shape
    elements = 1
    for dim, axes in zip(x.shape, spec, strict=True):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        elements *= -(-dim // math.prod(mesh[n] for n in names))
    return elements * x.dtype.itemsize


def state_bytes(state: steps.TrainState) -> StateBytes:
    """StateBytes of a train state whose leaves carry shardings (abstract or live)."""

    def local(tree) -> int:
        return sum(shard_bytes(x) for x in jax.tree.leaves(tree))

    def total(tree) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return StateBytes(
        local(state.params),
        local(state.opt_state),
        local((state.step, state.rng)),
        total(state.params),
        total(state.opt_state),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    run: build.Run  # partitioner, adapted model config, abstract state, steps
    memory: StateBytes


def plan(configs: Configs, partitioner: partitioning.Partitioner) -> Plan:
    """build_run on `partitioner`'s mesh (the trainer's checks and abstract train state) and the
    state's bytes; nothing is allocated."""
    run = build.build_run(configs, partitioner=partitioner)
    # The train step's trace-time checks (batch over data x expert x microbatches, MoE groups),
    # on a shapes-only batch: what the first step would refuse, info refuses.
    batch = steps.batch_shapes(run.model_cfg, configs.data.batch_size, run.lengths)
    steps.check_batch(run.model_cfg, batch, partitioner, configs.optimizer.microbatches)
    return Plan(run, state_bytes(run.setup.abstract_state))


def abstract_partitioner(train: TrainConfig, num_devices: int | None) -> partitioning.Partitioner:
    """Partitioner on an AbstractMesh of MESH_SHAPE; a -1 takes what is left of `num_devices`
    (default: it counts 1)."""
    known = math.prod(n for n in train.mesh_shape if n != -1)
    known *= math.prod(train.dcn_mesh_shape or ())
    return partitioning.Partitioner(
        train.mesh_shape,
        train.dcn_mesh_shape,
        train.partition_rules,
        num_devices=num_devices or known,
    )


def report(configs: Configs, num_devices: int | None = None) -> dict:
    """Model info (parameters, FLOPs) and per-device state bytes as one JSON-able dict."""
    p = plan(configs, abstract_partitioner(configs.train, num_devices))
    model_cfg, mem, info = p.run.model_cfg, p.memory, p.run.info
    need = mem.state_bytes_per_device + mem.param_bytes_per_device
    moe = model_cfg.moe
    return {
        "architecture": model_cfg.architecture,
        "layers": list(model_cfg.stack_depths()),
        "d_model": model_cfg.d_model,
        "d_ff": model_cfg.d_ff,
        "num_heads": model_cfg.num_heads,
        "activation": model_cfg.activation,
        "num_experts": moe.num_experts if moe else 0,
        "sparse_layers": [
            sum(model_cfg.is_sparse(i) for i in range(n)) for n in model_cfg.stack_depths()
        ],
        **info.as_dict(),
        "train_flops_per_sequence": 3 * info.flops_per_sequence,
        "batch_size": configs.data.batch_size,
        "mesh_shape": list(p.run.partitioner.mesh.shape.values()),
        "partition_rules": configs.train.partition_rules,
        "num_devices": p.run.partitioner.mesh.size,
        **dataclasses.asdict(mem),
        "state_bytes_per_device": mem.state_bytes_per_device,
        # Gradients are the parameters' size again while the update runs.
        "state_and_gradient_bytes_per_device": need,
        "fits_chips": {c.name: need <= c.hbm_bytes for c in _HBM_CHIPS},
    }


def format_report(r: dict) -> str:
    """Human-readable lines of `report`."""
    layers = "+".join(str(n) for n in r["layers"])
    experts = (
        f", {r['num_experts']} experts in {'+'.join(map(str, r['sparse_layers']))} sparse layers"
        if r["num_experts"]
        else ", dense"
    )
    share = r["expert_params"] / r["total_params"] if r["total_params"] else 0.0
    d, e, m = r["mesh_shape"]
    return "\n".join(
        [
            f"model          {r['architecture']} {layers} layers, d_model {r['d_model']}, "
            f"d_ff {r['d_ff']} {r['activation']}, {r['num_heads']} heads{experts}",
            f"parameters     {r['total_params']:,} ({_si(r['total_params'])}), "
            f"experts {r['expert_params']:,} ({share:.1%})",
            f"active/token   {r['active_params_per_token']:,} "
            f"({_si(r['active_params_per_token'])})",
            f"FLOPs/token    {_si(r['flops_per_token'])} forward "
            f"(lengths: inputs {r['input_length']}, targets {r['target_length']})",
            f"FLOPs/sequence {_si(r['flops_per_sequence'])} forward, "
            f"{_si(r['train_flops_per_sequence'])} forward+backward",
            f"mesh           data {d} x expert {e} x model {m} = {r['num_devices']} devices, "
            f"rules '{r['partition_rules']}', batch {r['batch_size']}",
            f"per device     parameters {gib(r['param_bytes_per_device'])} + Adafactor "
            f"{gib(r['optimizer_bytes_per_device'])} = {gib(r['state_bytes_per_device'])} "
            "(train state; gradients add the parameters again, activations not included)",
            fits_line(r["state_and_gradient_bytes_per_device"]),
        ]
    )


# The chips whose usable HBM the table knows, largest first.
_HBM_CHIPS = sorted((c for c in hardware.CHIPS if c.hbm_bytes), key=lambda c: -c.hbm_bytes)


def fits_line(need: int) -> str:
    """Which chips' HBM holds `need` bytes per device: "fits v5p (95.74 GiB), ...; not ..."."""

    def named(chips) -> str:
        return ", ".join(f"{c.name} ({c.hbm_bytes / 2**30:.2f} GiB)" for c in chips)

    fits = [c for c in _HBM_CHIPS if need <= c.hbm_bytes]
    too_small = [c for c in _HBM_CHIPS if need > c.hbm_bytes]
    verdict = f"fits {named(fits)}" if fits else "fits no TPU chip"
    verdict += f"; not {named(too_small)}" if too_small else ""
    return (
        f"HBM per chip   state + gradients {gib(need)}: {verdict} "
        "(before activations: `switch_jax.compile` measures those)"
    )


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_info(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    *,
    num_devices: int | None = None,
    as_json: bool = False,
) -> str:
    """What `python -m switch_jax.info` prints, for these gin files and bindings."""
    gin_config.parse_gin(gin_files, gin_bindings, search_paths)
    r = report(gin_config.load_configs(), num_devices)
    return json.dumps(r) if as_json else format_report(r)
