"""Distilling a Switch teacher into its dense twin (paper §4.2): mixed loss, student init, teacher.

The paper's recipe (REFERENCE §1.11): the student is the FLOP-matched dense model, initialised
with the teacher's non-expert weights, and trained on
    loss = soft_weight x CE(teacher probs, student) + (1 - soft_weight) x CE(labels, student)
with soft_weight = 0.25 ("0.75 mix of hard and soft loss"). The teacher runs without dropout or
jitter at the eval capacity factor.

    objective = distill_objective(teacher_cfg, teacher_graphdef)   # steps.make_train_step(...)
    params, report = init_from_teacher(student_params, teacher_params, student_cfg, teacher_cfg)
    run = attach_teacher(run_builder.build_run(configs))   # what the trainer does (distill.gin)

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.config.settings import DistillConfig  # noqa: F401 (re-exported: gin binds it there)
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
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
) -> dict:
    """Sums over real target tokens (float32) of the mixed objective and its parts.

    `objective` = soft_weight * T^2 * soft_cross_entropy + (1 - soft_weight) * cross_entropy,
    where soft_cross_entropy is CE(softmax(teacher / T), softmax(student / T)) and cross_entropy
    is the usual CE to the labels (what validation reports). Divide by `num_tokens`.
    """
    sums = losses.token_sums(student_logits_BLV, batch, z_loss)
    weights_BL = batch.get("decoder_loss_weights")
    weights_BL = (batch["decoder_target_tokens"] > 0) if weights_BL is None else weights_BL
    weights_BL = weights_BL.astype(jnp.float32)
    # The teacher is a fixed target: no gradient flows into its parameters.
    teacher_BLV = jax.lax.stop_gradient(teacher_logits_BLV.astype(jnp.float32)) / temperature
    student_BLV = student_logits_BLV.astype(jnp.float32) / temperature
    soft_ce_BL = -jnp.sum(
        jax.nn.softmax(teacher_BLV, axis=-1) * jax.nn.log_softmax(student_BLV, axis=-1), axis=-1
    )
    sums["soft_cross_entropy"] = jnp.sum(soft_ce_BL * weights_BL)
    sums["objective"] = (
        soft_weight * temperature**2 * sums["soft_cross_entropy"]
        + (1.0 - soft_weight) * sums["cross_entropy"]
    )
    return sums


def distill_objective(
    teacher_cfg: ModelConfig,
    teacher_graphdef,
    *,
    soft_weight: float = 0.25,
    temperature: float = 1.0,
) -> Callable:
    """`token_sums(student_logits_BLV, batch, teacher_params, z_loss)` for steps.make_train_step.

    The teacher forward runs inside the student's train step (no dropout, no jitter, eval
    capacity factor: `train=False`), on the same microbatch, sharded like any model.
    """
    del teacher_cfg  # the graphdef carries it; kept in the signature for readability at call sites

    def token_sums(student_logits_BLV, batch, teacher_params, z_loss):
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        teacher_logits_BLV, _ = teacher(batch, train=False, keys=NO_NOISE)
        return distill_token_sums(
            student_logits_BLV,
            teacher_logits_BLV,
            batch,
            soft_weight=soft_weight,
            temperature=temperature,
            z_loss=z_loss,
        )

    return token_sums


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

_READ_CONFIG = """
import dataclasses, json, sys
from switch_jax.config import gin_config
gin_config.parse_gin([sys.argv[1]], finalize=False)
print(json.dumps(dataclasses.asdict(gin_config.load_configs().model)))
"""


def read_model_config(model_dir: str) -> ModelConfig:
    """The ModelConfig that MODEL_DIR/config.gin describes (ours or the converter's).

    Parsed in a child process: gin's state is global, and this process's gin holds the
    student's run, which must stay as it is (it is the student's operative config).
    """
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from etils import epath  # noqa: PLC0415

    path = epath.Path(model_dir) / "config.gin"
    if not path.exists():
        raise ConfigError(f"TEACHER_MODEL_DIR={model_dir} has no config.gin (not a MODEL_DIR?)")
    with tempfile.TemporaryDirectory() as tmp:  # a local copy: gin reads local files only
        local = os.path.join(tmp, "config.gin")
        with open(local, "w") as f:
            f.write(path.read_text())
        command = [sys.executable, "-c", _READ_CONFIG, local]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise ConfigError(f"TEACHER_MODEL_DIR={model_dir}: its config.gin fails: {last}")
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    moe = fields.pop("moe")
    return ModelConfig(**fields, moe=MoeConfig(**moe) if moe else None)


def attach_teacher(run):
    """`run` (run_builder.Run) with the distill objective: its train step runs the teacher of
    DistillConfig.teacher_model_dir and minimises the mixed loss; a fresh state starts from the
    teacher's non-expert weights. The teacher is restored read-only (params only), sharded with
    the run's partitioner like any model.
    """
    from switch_jax.store import checkpoints  # noqa: PLC0415

    cfg, part = run.configs.distill, run.partitioner
    teacher_cfg = part.adapt_model_config(
        read_model_config(cfg.teacher_model_dir), run.configs.data.batch_size
    )
    if teacher_cfg.vocab_size != run.model_cfg.vocab_size:
        raise ConfigError(
            f"the teacher's vocab_size {teacher_cfg.vocab_size} differs from the student's "
            f"{run.model_cfg.vocab_size}: distillation compares their output distributions"
        )
    opt = run.configs.optimizer
    t_abstract = steps.abstract_train_state(teacher_cfg, opt, part)
    with part.activate():
        teacher = checkpoints.restore_params(cfg.teacher_model_dir, t_abstract.state.params)
    s_abstract = steps.abstract_train_state(run.model_cfg, opt, part)
    objective = distill_objective(
        teacher_cfg, t_abstract.graphdef, soft_weight=cfg.soft_weight, temperature=cfg.temperature
    )
    step = steps.make_train_step(
        run.model_cfg,
        opt,
        part,
        abstract=s_abstract,
        skip_nonfinite=run.configs.train.skip_nonfinite_updates,
        objective=objective,
        extra_shardings=(t_abstract.shardings.params,),
    )
    init_state = run.setup.init_state
    if cfg.init_from_teacher:

        def merge(student, teacher):
            return init_from_teacher(student, teacher, run.model_cfg, teacher_cfg)[0]

        # Shapes only: a student that is not the teacher's dense twin fails here, before init.
        jax.eval_shape(merge, s_abstract.state.params, t_abstract.state.params)
        copy = jax.jit(merge, out_shardings=s_abstract.shardings.params)

        def init_state():
            state = run.setup.init_state()
            with part.activate():
                return state._replace(params=copy(state.params, teacher))

    setup = dataclasses.replace(
        run.setup,
        train_step=lambda state, batch: step(state, batch, teacher),
        init_state=init_state,
    )
    return dataclasses.replace(run, setup=setup)
