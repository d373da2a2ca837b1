"""Mesh ('data', 'expert', 'model'), the logical-axis rule table, shardings of state and batches.

Public API (used by steps.py and the trainer):

    p = Partitioner(mesh_shape=(-1, 1, 1), dcn_mesh_shape=None, rules="default")
    p = Partitioner(mesh_shape, devices=topology_devices)  # e.g. compile-only TPU devices
    p = Partitioner(mesh_shape, num_devices=64)  # AbstractMesh: shardings, no devices (planning)
    model_cfg = p.adapt_model_config(model_cfg, batch_size)  # checks + num_expert_partitions
    with p.activate():                      # jax.set_mesh + logical rules: constraints work
        ...
    p.param_shardings(abstract_params)      # nnx.State of Variables -> same tree of NamedSharding
    p.logical_shardings(spec_tree, param=True)  # tree of logical P(...) -> NamedSharding tree
    p.batch_sharding, p.replicated          # NamedSharding of [B, ...] inputs / of scalars
    p.host_batch_slice(global_batch_size)   # rows this process feeds
    p.shard_batch(host_batch)               # per-host numpy dict -> global jax.Arrays
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.moe import resolve_dispatch, resolve_grouped_matmul

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")  # order matters: see the 'expert_group' rule

# One table for parameters and activations. 'batch' is split over data and expert jointly; the
# expert-sharded layout [E, G, C, D] keeps the *same* groups on each data coordinate
# ('expert_group' -> 'data'), so moving between the two layouts is an all-to-all inside the
# expert axis only. Every logical name the model uses must appear: flax passes unknown names
# through unchanged, and they are not mesh axes.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("expert_group", "data"),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("expert_capacity", None),
    ("unmodeled", None),
    ("relpos_buckets", None),
    ("layers", None),
)
# FSDP (ZeRO-3 style): parameter matrices (and their optimizer statistics) also shard 'embed'
# over 'data'; XLA all-gathers them per layer. Activations keep the default table, since their
# 'batch' dimension already uses 'data'.
FSDP_PARAM_OVERRIDES = (("embed", "data"),)

RuleSet = Literal["default", "fsdp"]


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int, name: str = "MESH_SHAPE"):
    """Replace one -1 by whatever makes the product equal `num_devices`."""
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"{name}={shape} must be 3 positive sizes (data, expert, model), at most one -1"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"{name}={shape} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"{name}={shape} has {math.prod(shape)} devices but there are {num_devices}; "
            f"make the product equal or use -1 for 'the rest'"
        )
    return shape


def make_mesh(
    mesh_shape: Sequence[int] = (-1, 1, 1),
    dcn_mesh_shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """`mesh_shape` is per slice (ICI); `dcn_mesh_shape` multiplies it across slices / hosts."""
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * 3  # Explicit (the jax>=0.9 default) ignores our constraints
    if not dcn_mesh_shape:
        shape = resolve_mesh_shape(mesh_shape, len(devices))
        array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(array, MESH_AXES, axis_types=axis_types)
    by_process = _granules_are_processes(devices)
    granules = {d.process_index if by_process else d.slice_index for d in devices}
    dcn = resolve_mesh_shape(dcn_mesh_shape, len(granules), "DCN_MESH_SHAPE")
    shape = resolve_mesh_shape(mesh_shape, len(devices) // math.prod(dcn))
    array = mesh_utils.create_hybrid_device_mesh(
        shape, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=True
    )
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def make_abstract_mesh(
    mesh_shape: Sequence[int], dcn_mesh_shape: Sequence[int] | None, num_devices: int
) -> AbstractMesh:
    """The mesh `make_mesh` would build on `num_devices` devices, as axis sizes only.

    Across slices each axis is (per-slice size) x (DCN size), as in create_hybrid_device_mesh.
    """
    dcn = (1, 1, 1)
    if dcn_mesh_shape:
        if -1 in dcn_mesh_shape:
            raise ConfigError(f"DCN_MESH_SHAPE={tuple(dcn_mesh_shape)}: give every size to plan")
        dcn = resolve_mesh_shape(dcn_mesh_shape, math.prod(dcn_mesh_shape), "DCN_MESH_SHAPE")
        if num_devices % math.prod(dcn):
            raise ConfigError(f"DCN_MESH_SHAPE={dcn} does not divide the {num_devices} devices")
    ici = resolve_mesh_shape(mesh_shape, num_devices // math.prod(dcn))
    shape = tuple(i * d for i, d in zip(ici, dcn, strict=True))
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _granules_are_processes(devices) -> bool:
    """TPU slices are the DCN granules; without several slices (CPU/GPU hosts), processes are."""
    return len({getattr(d, "slice_index", 0) for d in devices}) <= 1


@dataclasses.dataclass
class Partitioner:
    """Owns the mesh and the rule table; every sharding in the project comes from here."""

    mesh_shape: Sequence[int] = (-1, 1, 1)
    dcn_mesh_shape: Sequence[int] | None = None
    rules: RuleSet = "default"
    devices: Sequence[jax.Device] | None = None  # default jax.devices(); or compile-only ones
    # Plan without devices: an AbstractMesh of this many devices. Shardings, state shapes and
    # adapt_model_config work; anything that places data (shard_batch) does not.
    num_devices: int | None = None
    # The platform an abstract plan is for ('auto' dispatch resolves by it; state bytes do not
    # depend on it). Ignored when there are devices: theirs is used.
    planned_platform: str = "tpu"

    def __post_init__(self):
        if self.rules not in ("default", "fsdp"):
            raise ConfigError(f"partition_rules={self.rules!r} must be 'default' or 'fsdp'")
        if self.num_devices is not None and self.devices is not None:
            raise ValueError("give Partitioner either devices or num_devices, not both")
        if self.num_devices is not None:
            self.mesh = make_abstract_mesh(self.mesh_shape, self.dcn_mesh_shape, self.num_devices)
        else:
            self.mesh = make_mesh(self.mesh_shape, self.dcn_mesh_shape, self.devices)
        self.activation_rules = DEFAULT_RULES
        overrides = dict(FSDP_PARAM_OVERRIDES) if self.rules == "fsdp" else {}
        self.param_rules = tuple((k, overrides.get(k, v)) for k, v in DEFAULT_RULES)

    # --- sizes -------------------------------------------------------------------------------
    @property
    def platform(self) -> str:
        """'cpu' | 'gpu' | 'tpu' of the devices the step compiles for (the plan's, if abstract)."""
        if isinstance(self.mesh, AbstractMesh):
            return self.planned_platform
        return self.mesh.devices.flat[0].platform

    def axis_size(self, name: str) -> int:
        """Devices along mesh axis `name` ('data', 'expert' or 'model')."""
        return self.mesh.shape[name]

    @property
    def is_abstract(self) -> bool:
        """True for a planning mesh without devices (`info`): nothing can be placed on it."""
        return isinstance(self.mesh, AbstractMesh)

    @property
    def batch_shards(self) -> int:
        """How many ways the batch (and the MoE groups) are split."""
        return self.axis_size("data") * self.axis_size("expert")

    # --- context -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self):
        """Constraints in the model only act under both the mesh and the logical rules."""
        # jax.set_mesh takes concrete meshes only; an abstract one is enough for tracing.
        use = jax.sharding.use_abstract_mesh if self.is_abstract else jax.set_mesh
        with use(self.mesh), core_spmd.logical_axis_rules(self.activation_rules):
            yield self

    # --- model config --------------------------------------------------------------------------
    def adapt_model_config(self, cfg: ModelConfig, batch_size: int | None = None) -> ModelConfig:
        """Check that the model splits over this mesh and set the MoE group partitioning.

        Groups must split evenly over all batch shards (data x expert), or the token-sharded
        constraint would be dropped silently; so num_expert_partitions = data * expert.
        """
        data, expert, model = (self.axis_size(a) for a in MESH_AXES)
        if batch_size is not None and batch_size % (data * expert):
            raise ConfigError(
                f"BATCH_SIZE={batch_size} must be divisible by data x expert = {data}x{expert} "
                f"(MESH_SHAPE={tuple(self.mesh.shape.values())})"
            )
        for name in ("d_ff", "num_heads", "vocab_size"):
            if getattr(cfg, name) % model:
                raise ConfigError(
                    f"ModelConfig.{name}={getattr(cfg, name)} must be divisible by the model "
                    f"axis ({model}) of MESH_SHAPE"
                )
        if self.rules == "fsdp" and cfg.d_model % data:
            raise ConfigError(
                f"partition_rules='fsdp' needs ModelConfig.d_model={cfg.d_model} divisible by "
                f"the data axis ({data}) of MESH_SHAPE"
            )
        if cfg.moe is None:
            return cfg
        if cfg.moe.num_experts % expert:
            raise ConfigError(
                f"MoeConfig.num_experts={cfg.moe.num_experts} must be divisible by the expert "
                f"axis ({expert}) of MESH_SHAPE"
            )
        # 'auto' dispatch for the platform the step compiles for (TPU devices on a CPU host too).
        moe = dataclasses.replace(
            cfg.moe,
            num_expert_partitions=data * expert,
            dispatch=resolve_dispatch(cfg.moe.dispatch, self.platform),
            grouped_matmul=resolve_grouped_matmul(cfg.moe.grouped_matmul, self.platform),
        )
        return dataclasses.replace(cfg, moe=moe)

    # --- shardings -----------------------------------------------------------------------------
    def mesh_spec(self, logical_axes: Sequence[str | None], *, param: bool = False) -> P:
        """Logical names -> PartitionSpec over mesh axes (FSDP applies to matrices only)."""
        rules = self.param_rules if (param and len(logical_axes) >= 2) else self.activation_rules
        table = dict(rules)
        unknown = [a for a in logical_axes if a is not None and a not in table]
        if unknown:
            raise ValueError(f"logical axes {unknown} have no rule in partitioning.DEFAULT_RULES")
        return P(*core_spmd.from_sharding_rules(tuple(logical_axes), rules))

    def sharding(self, logical_axes: Sequence[str | None], *, param: bool = False):
        """NamedSharding of an array whose dimensions carry `logical_axes` (see mesh_spec)."""
        return NamedSharding(self.mesh, self.mesh_spec(logical_axes, param=param))

    def param_shardings(self, abstract_params):
        """Same tree as `abstract_params` (Variables kept), values replaced by NamedShardings."""

        def one(v):
            axes = v.get_metadata().get("out_sharding") or (None,) * v.ndim
            return v.replace(self.sharding(axes, param=True))

        return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def logical_shardings(self, spec_tree, *, param: bool = True):
        """A tree whose leaves are PartitionSpecs of *logical* names -> NamedShardings."""
        return jax.tree.map(
            lambda spec: self.sharding(tuple(spec), param=param),
            spec_tree,
            is_leaf=lambda x: isinstance(x, P),
        )

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device (scalars, the step counter, RNG keys)."""
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) dimension over ('data', 'expert'); the rest replicated."""
        return NamedSharding(self.mesh, P(BATCH_AXES))

    def host_batch_slice(self, global_batch_size: int) -> slice:
        """Rows of the global batch that this process must feed to `shard_batch`."""
        self._need_devices("host_batch_slice")
        index_map = self.batch_sharding.addressable_devices_indices_map((global_batch_size,))
        starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
        rows = slice(starts[0][0], starts[-1][1])
        if sum(b - a for a, b in starts) != rows.stop - rows.start:
            raise ConfigError(
                f"process {jax.process_index()} holds non-contiguous batch rows {starts}; "
                f"put the data/expert axes of MESH_SHAPE across hosts (DCN_MESH_SHAPE)"
            )
        return rows

    def shard_batch(self, host_batch: dict) -> dict:
        """This process's rows (numpy) -> global arrays sharded like `batch_sharding`.

        Host values must stay numpy: `jnp.array` under `jax.set_mesh` makes a replicated array.
        """
        self._need_devices("shard_batch")
        return {
            name: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(value))
            for name, value in host_batch.items()
        }

    def _need_devices(self, what: str) -> None:
        if self.is_abstract:
            raise ValueError(f"Partitioner.{what} needs devices; this one has an AbstractMesh")
