"""Distilling a Switch teacher into its dense twin (paper §4.2): mixed loss, student init, teacher.

The paper's recipe (REFERENCE §1.11): the student is the FLOP-matched dense model, initialised
with the teacher's non-expert weights, and trained on
    loss = soft_weight x CE(teacher probs, student) + (1 - soft_weight) x CE(labels, student)
with soft_weight = 0.25 ("0.75 mix of hard and soft loss"). The teacher runs without dropout or
jitter at the eval capacity factor.

    objective = distill_objective(teacher_cfg, steps.abstract_params(teacher_cfg, partitioner))
    setup = steps.setup_training(student_cfg, opt_cfg, partitioner, objective=objective)
    params, report = init_from_teacher(student_params, teacher_params, student_cfg, teacher_cfg)
    objective = objective_from_configs(configs, student_cfg, partitioner)  # build.build_run's

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.config.settings import DistillConfig  # noqa: F401 (re-exported: gin binds it there)
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.transformer import NO_NOISE
from switch_jax.training import losses, steps

# Keys of the per-layer ("canonical") parameter names: (stack, LAYER, i, module..., leaf).
LAYER = "layer"


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The FLOP-matched dense model: same shapes, every Switch FFN replaced by a dense FFN."""
    return cfg.replace(moe=None)


# --- loss -----------------------------------------------------------------------------------


def distill_token_sums(
    student_logits_BLV: jax.Array,
    teacher_logits_BLV: jax.Array,
    batch: dict,
    *,
    soft_weight: float,
    temperature: float = 1.0,
    z_loss: float = 0.0,
) -> losses.TokenSums:
    """Token sums minimising the mixed objective, reported with its parts.

    `objective` = soft_weight * T^2 * soft_cross_entropy + (1 - soft_weight) * cross_entropy,
    where soft_cross_entropy is CE(softmax(teacher / T), softmax(student / T)) and cross_entropy
    is the usual CE to the labels (what validation reports). Divide by `num_tokens`.
    """
    sums = losses.token_sums(student_logits_BLV, batch, z_loss)
    weights_BL = losses.target_weights(batch)
    # The teacher is a fixed target: no gradient flows into its parameters.
    teacher_BLV = jax.lax.stop_gradient(teacher_logits_BLV.astype(jnp.float32)) / temperature
    student_BLV = student_logits_BLV.astype(jnp.float32) / temperature
    soft_ce_BL = -jnp.sum(
        jax.nn.softmax(teacher_BLV, axis=-1) * jax.nn.log_softmax(student_BLV, axis=-1), axis=-1
    )
    soft = jnp.sum(soft_ce_BL * weights_BL)
    objective = soft_weight * temperature**2 * soft + (1.0 - soft_weight) * sums.minimised
    reported = {**sums.reported, "soft_cross_entropy": soft, "objective": objective}
    return sums._replace(minimised=objective, reported=reported)


def distill_objective(
    teacher_cfg: ModelConfig,
    teacher: steps.AbstractParams,
    *,
    soft_weight: float = 0.25,
    temperature: float = 1.0,
    load_teacher: Callable[[], Any] | None = None,
    student_cfg: ModelConfig | None = None,
) -> losses.Objective:
    """The mixed objective; the train step's one further input is the teacher's params.

    The teacher forward runs inside the student's train step (no dropout, no jitter, eval
    capacity factor: `train=False`), on the same microbatch, sharded like any model.

    Args:
      teacher_cfg: the teacher's model config (adapted to the mesh).
      teacher: its abstract params (steps.abstract_params), which give the step its sharding.
      load_teacher: reads the teacher's params (at the first step or init); None: the caller
        passes them to the bare step (steps.make_train_step).
      student_cfg: given, a fresh student starts from the teacher's non-expert weights.
    """

    def token_sums(student_logits_BLV, batch, teacher_params, z_loss):
        teacher_model = nnx.merge(teacher.graphdef, teacher_params)
        teacher_logits_BLV, _ = teacher_model(batch, train=False, keys=NO_NOISE)
        return distill_token_sums(
            student_logits_BLV,
            teacher_logits_BLV,
            batch,
            soft_weight=soft_weight,
            temperature=temperature,
            z_loss=z_loss,
        )

    def from_teacher(student_params, teacher_params):
        return init_from_teacher(student_params, teacher_params, student_cfg, teacher_cfg)[0]

    return losses.Objective(
        token_sums=token_sums,
        abstract_inputs=(teacher.params,),
        load_inputs=(lambda: (load_teacher(),)) if load_teacher else tuple,
        init_params=from_teacher if student_cfg is not None else None,
    )


# --- student initialisation -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitReport:
    """Canonical per-layer names, e.g. ('encoder', 'layer', 1, 'mlp', 'wi')."""

    copied: tuple[tuple, ...]  # student = teacher, exactly
    student_own: tuple[tuple, ...]  # left at the student's init: its FFN at the sparse layers
    teacher_unused: tuple[tuple, ...]  # the teacher's routers and experts


def _block_size(cfg: ModelConfig) -> int:
    return cfg.moe.sparse_every if (cfg.moe and cfg.moe.sparse_every) else 1


def _flat(params) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(params)}


def per_layer(params, cfg: ModelConfig) -> dict[tuple, jax.Array]:
    """Parameter values by canonical name: one entry per layer whether or not layers are scanned.

    Unscanned: (stack, 'blocks', i, 'layers', 0, ...) is layer i. Scanned: (stack, 'blocks',
    'layers', j, ...) holds layers j, j + every, j + 2 every, ... along its leading axis.
    """
    out = {}
    every = _block_size(cfg)
    for path, var in _flat(params).items():
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        if "blocks" not in path:
            out[path] = value
            continue
        i = path.index("blocks")
        stack = path[:i]
        if cfg.scan_layers:
            j, rest = path[i + 2], path[i + 3 :]
            for b in range(value.shape[0]):
                out[(*stack, LAYER, b * every + j, *rest)] = value[b]
        else:
            out[(*stack, LAYER, path[i + 1] + path[i + 3], *path[i + 4 :])] = value
    return out


def _is_expert(name: tuple, cfg: ModelConfig) -> bool:
    """Router and expert weights of a Switch layer (the only teacher weights not copied)."""
    if LAYER not in name:
        return False
    i = name.index(LAYER)
    return cfg.is_sparse(name[i + 1]) and name[i + 2] == "mlp"


def _plan(student: dict, teacher: dict, teacher_cfg: ModelConfig) -> InitReport:
    copied, own = [], []
    for name, value in student.items():
        if _is_expert(name, teacher_cfg):
            own.append(name)
            continue
        other = teacher.get(name)
        if other is None or other.shape != value.shape:
            raise ConfigError(
                f"the student's {'/'.join(map(str, name))} {tuple(value.shape)} has no teacher "
                f"twin ({'missing' if other is None else tuple(other.shape)}): the student must "
                "be the teacher's dense twin (same shapes outside the Switch layers)"
            )
        copied.append(name)
    unused = tuple(n for n in teacher if n not in student or _is_expert(n, teacher_cfg))
    strays = [n for n in unused if not _is_expert(n, teacher_cfg)]
    if strays:
        raise ConfigError(
            f"teacher weight {'/'.join(map(str, strays[0]))} has no place in the student: the "
            "student must be the teacher's dense twin"
        )
    return InitReport(tuple(copied), tuple(own), unused)


def init_from_teacher(
    student_params, teacher_params, student_cfg: ModelConfig, teacher_cfg: ModelConfig
) -> tuple[object, InitReport]:
    """Student params with every non-expert weight replaced by the teacher's (paper §4.2).

    Works on concrete or traced trees (call it under jit to keep shardings); the weights of the
    student's FFNs at the teacher's Switch layers keep their initialisation.

    Raises:
      ConfigError: the two models differ anywhere outside the Switch layers.
    """
    student = per_layer(student_params, student_cfg)
    teacher = per_layer(teacher_params, teacher_cfg)
    report = _plan(student, teacher, teacher_cfg)
    merged = {**student, **{n: teacher[n].astype(student[n].dtype) for n in report.copied}}
    every = _block_size(student_cfg)
    flat = _flat(student_params)
    new_values = {}
    for path, var in flat.items():
        if "blocks" not in path:
            new_values[path] = merged[path]
            continue
        i = path.index("blocks")
        stack = path[:i]
        if student_cfg.scan_layers:
            j, rest = path[i + 2], path[i + 3 :]
            n = var.get_value().shape[0]
            new_values[path] = jnp.stack(
                [merged[(*stack, LAYER, b * every + j, *rest)] for b in range(n)]
            )
        else:
            new_values[path] = merged[(*stack, LAYER, path[i + 1] + path[i + 3], *path[i + 4 :])]
    updated = nnx.from_flat_state(
        [(path, var.replace(new_values[path])) for path, var in flat.items()]
    )
    return updated, report


# --- the teacher of a run -------------------------------------------------------------------


def objective_from_configs(configs, student_cfg: ModelConfig, partitioner) -> losses.Objective:
    """The distillation objective of `configs.distill` for the student `student_cfg` (adapted to
    `partitioner`): the teacher of DistillConfig.teacher_model_dir runs inside the train step
    and the student minimises the mixed loss; with init_from_teacher a fresh state starts from
    the teacher's non-expert weights. The teacher's params are restored read-only (params only)
    at first use, sharded with the run's partitioner like any model.

    Raises:
      ConfigError: the teacher's config is missing or its vocabulary is not the student's.
    """
    from switch_jax.store import checkpoints, stored_config  # noqa: PLC0415

    cfg = configs.distill
    teacher_cfg = partitioner.adapt_model_config(
        stored_config.read_model_config(cfg.teacher_model_dir, setting="TEACHER_MODEL_DIR"),
        configs.data.batch_size,
    )
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ConfigError(
            f"the teacher's vocab_size {teacher_cfg.vocab_size} differs from the student's "
            f"{student_cfg.vocab_size}: distillation compares their output distributions"
        )
    teacher = steps.abstract_params(teacher_cfg, partitioner)

    def load_teacher():
        with partitioner.activate():
            return checkpoints.restore_params(cfg.teacher_model_dir, teacher.params)

    return distill_objective(
        teacher_cfg,
        teacher,
        soft_weight=cfg.soft_weight,
        temperature=cfg.temperature,
        load_teacher=load_teacher,
        student_cfg=student_cfg if cfg.init_from_teacher else None,
    )
