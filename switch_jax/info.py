"""What a config costs: parameters, FLOPs and per-device memory for a mesh, without devices.

    python -m switch_jax.info --gin_file=models/switch_base.gin [--gin.MESH_SHAPE="(1, 8, 1)"]
        [--num_devices=N] [--json]

Prints total and per-token active parameters, forward FLOPs per token and per sequence
(switch_jax.models.info), and for MESH_SHAPE the per-device bytes of the parameters and of the
Adafactor statistics. Per-device bytes come from the abstract parameter shapes and their logical
axes mapped to mesh axes by the partitioning rule table: each dimension is split by the product of
the mesh-axis sizes its logical axis maps to (rounded up, as XLA pads). Nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence

import jax
from flax import nnx

from switch_jax import gin_utils
from switch_jax.models import info as models_info
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.run_config import OptimizerConfig, TrainConfig

MESH_AXES = ("data", "expert", "model")
# Logical axis -> mesh axes, DESIGN.md's table (T5X MoE rules, REFERENCE §3.3). Only parameter
# axes matter here; 'fsdp' also splits the embed dimension of every weight over 'data'.
# TODO(partitioning): read these from switch_jax.partitioning once its rule table lands.
RULES = {
    "default": {"expert": ("expert",), "mlp": ("model",), "heads": ("model",), "vocab": ("model",)},
    "fsdp": {
        "expert": ("expert",),
        "mlp": ("model",),
        "heads": ("model",),
        "vocab": ("model",),
        "embed": ("data",),
    },
}
MIN_DIM_TO_FACTOR = 128  # optax.adafactor's min_dim_size_to_factor
BATCH_AXES = ("expert", "layers")  # Adafactor keeps separate statistics along these


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    mesh_shape: tuple[int, int, int]
    partition_rules: str
    param_bytes_per_device: int
    optimizer_bytes_per_device: int  # Adafactor second-moment statistics (no momentum)
    params_and_optimizer_bytes_per_device: int
    param_bytes_total: int
    optimizer_bytes_total: int


def resolve_mesh(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Replace one -1 by what is left of `num_devices` (at least 1)."""
    if list(mesh_shape).count(-1) > 1:
        raise ConfigError(f"MESH_SHAPE={tuple(mesh_shape)} may contain at most one -1")
    rest = math.prod(n for n in mesh_shape if n != -1)
    if rest < 1:
        raise ConfigError(f"MESH_SHAPE={tuple(mesh_shape)} entries must be >= 1 (or one -1)")
    return tuple(max(1, num_devices // rest) if n == -1 else n for n in mesh_shape)


def _split(axes: Sequence[str | None], rules: dict, mesh: dict[str, int]) -> list[int]:
    """How many ways each dimension is split; a mesh axis shards at most one dimension."""
    used, splits = set(), []
    for axis in axes:
        mesh_axes = [m for m in rules.get(axis, ()) if m not in used]
        used.update(mesh_axes)
        splits.append(math.prod(mesh[m] for m in mesh_axes))
    return splits


def _local_size(shape: Sequence[int], splits: Sequence[int]) -> int:
    return math.prod(-(-dim // n) for dim, n in zip(shape, splits, strict=True))


def adafactor_shapes(shape: Sequence[int], axes: Sequence[str], factored: bool) -> list[list[int]]:
    """Indices of the dims kept by each Adafactor statistic of a parameter.

    T5X's factor rules: the 'embed' dim is the row, every other dim except 'expert' and 'layers'
    (scanned stacks) a column, so a [D, H, K] kernel keeps [D] + [H, K] and an expert kernel
    [E, D, F] keeps [E, D] + [E, F] (never reduced over experts). Without an 'embed' dim, optax's rule: the two largest dims if
    both are >= 128. Vectors and small matrices keep one full-size statistic.
    """
    full = [list(range(len(shape)))]
    free = [i for i, a in enumerate(axes) if a not in BATCH_AXES]
    if not factored or len(free) < 2:
        return full
    rows = [i for i in free if axes[i] == "embed"][:1]
    if not rows:
        free.sort(key=lambda i: shape[i])
        if shape[free[-2]] < MIN_DIM_TO_FACTOR:
            return full
        rows, free = [free[-1]], free[-2:]
    cols = [i for i in free if i not in rows]
    batch = [i for i in range(len(shape)) if i not in free]
    return [sorted(batch + rows), sorted(batch + cols)]


def memory_info(
    cfg: ModelConfig,
    mesh_shape: Sequence[int],
    partition_rules: str = "default",
    optimizer: OptimizerConfig | None = None,
) -> MemoryInfo:
    """Per-device bytes of parameters and Adafactor state for a fully specified mesh shape."""
    if partition_rules not in RULES:
        raise ConfigError(f"PARTITION_RULES={partition_rules!r} must be one of {sorted(RULES)}")
    if len(mesh_shape) != 3 or min(mesh_shape) < 1:
        raise ConfigError(f"MESH_SHAPE={tuple(mesh_shape)} must be 3 sizes >= 1")
    factored = optimizer.factored if optimizer else True
    rules, mesh = RULES[partition_rules], dict(zip(MESH_AXES, mesh_shape, strict=True))
    p_local = p_total = o_local = o_total = 0
    for shape, axes, itemsize in _param_leaves(cfg):
        splits = _split(axes, rules, mesh)
        p_local += _local_size(shape, splits) * itemsize
        p_total += math.prod(shape) * itemsize
        for kept in adafactor_shapes(shape, axes, factored):
            sub_shape = [shape[i] for i in kept]
            o_local += _local_size(sub_shape, [splits[i] for i in kept]) * 4  # float32 stats
            o_total += math.prod(sub_shape) * 4
    return MemoryInfo(
        tuple(mesh_shape), partition_rules, p_local, o_local, p_local + o_local, p_total, o_total
    )


@functools.lru_cache(maxsize=32)
def _param_leaves(cfg: ModelConfig) -> tuple[tuple[tuple[int, ...], tuple, int], ...]:
    """(shape, logical axes, itemsize) of every parameter; one abstract model per config."""
    try:
        # Same parameters, stacked over a 'layers' axis: tracing one scanned block instead of
        # every layer makes this ~20x faster for the 48-layer models.
        cfg = cfg.replace(scan_layers=True)
    except ConfigError:
        pass  # layer counts not divisible by sparse_every: build the layers one by one
    params = nnx.state(models_info.abstract_model(cfg), nnx.Param)
    out = []
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape, axes = tuple(leaf.shape), tuple(leaf.get_metadata().get("out_sharding") or ())
        axes = axes if len(axes) == len(shape) else (None,) * len(shape)
        out.append((shape, axes, jax.numpy.dtype(leaf.dtype).itemsize))
    return tuple(out)


def model_info(cfg: ModelConfig, input_length: int, target_length: int) -> models_info.ModelInfo:
    """models.info.model_info from the cached parameter list (building the abstract model of a
    large config costs seconds; tests check both agree)."""
    total = sum(math.prod(shape) for shape, _, _ in _param_leaves(cfg))
    expert = sum(math.prod(shape) for shape, axes, _ in _param_leaves(cfg) if "expert" in axes)
    k_over_e = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe else 0.0
    active = total - expert + int(round(expert * k_over_e))
    flops = models_info._sequence_flops(cfg, input_length, target_length)  # noqa: SLF001
    tokens = (input_length if cfg.is_encoder_decoder else 0) + target_length
    return models_info.ModelInfo(
        total, expert, active, flops / tokens, flops, input_length, target_length
    )


def report(
    model_cfg: ModelConfig,
    run: TrainConfig,
    optimizer: OptimizerConfig | None = None,
    num_devices: int | None = None,
) -> dict:
    """Model info (parameters, FLOPs) and per-device memory as one JSON-able dict."""
    lengths = run.feature_lengths
    inputs = lengths.get("inputs", 0) if model_cfg.is_encoder_decoder else 0
    info = model_info(model_cfg, inputs, lengths.get("targets", 114))
    devices = num_devices or math.prod(n for n in run.mesh_shape if n != -1)
    mesh = resolve_mesh(run.mesh_shape, devices)
    memory = memory_info(model_cfg, mesh, run.partition_rules, optimizer)
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
        **dataclasses.asdict(memory),
        "num_devices": math.prod(mesh),
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
    lines = [
        f"model          {r['architecture']} {layers} layers, d_model {r['d_model']}, "
        f"d_ff {r['d_ff']} {r['activation']}, {r['num_heads']} heads{experts}",
        f"parameters     {r['total_params']:,} ({_si(r['total_params'])}), "
        f"experts {r['expert_params']:,} ({share:.1%})",
        f"active/token   {r['active_params_per_token']:,} ({_si(r['active_params_per_token'])})",
        f"FLOPs/token    {_si(r['flops_per_token'])} forward "
        f"(lengths: inputs {r['input_length']}, targets {r['target_length']})",
        f"FLOPs/sequence {_si(r['flops_per_sequence'])} forward, "
        f"{_si(r['train_flops_per_sequence'])} forward+backward",
        f"mesh           data {d} x expert {e} x model {m} = {r['num_devices']} devices, "
        f"rules '{r['partition_rules']}'",
        f"per device     parameters {_gib(r['param_bytes_per_device'])} + Adafactor "
        f"{_gib(r['optimizer_bytes_per_device'])} = "
        f"{_gib(r['params_and_optimizer_bytes_per_device'])} "
        "(gradients add the parameter size again; activations not included)",
    ]
    return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _gib(n: int) -> str:
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
    gin_utils.parse_gin(gin_files, gin_bindings, search_paths)
    model_cfg, run, optimizer = gin_utils.load_run_configs()
    r = report(model_cfg, run, optimizer, num_devices)
    return json.dumps(r) if as_json else format_report(r)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --gin_file / --gin.NAME=")
    f = flags.FLAGS
    print(
        run_info(
            f.gin_file,
            f.gin_bindings,
            f.gin_search_paths,
            num_devices=f.num_devices,
            as_json=f.json,
        )
    )


if __name__ == "__main__":
    from absl import flags

    gin_utils.define_flags()
    flags.DEFINE_bool("json", False, "print one JSON object instead of text")
    flags.DEFINE_integer(
        "num_devices",
        None,
        "total devices, to resolve a -1 in MESH_SHAPE (default: it counts 1)",
    )
    gin_utils.run(main)
