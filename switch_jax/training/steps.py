"""Pure training functions: state creation, jit-compiled train and eval steps (no I/O); the loss
itself is switch_jax.training.losses.

Public API:

    setup = setup_training(model_cfg, opt_cfg, partitioner, seed=0)
    setup.init_state() -> TrainState          # created under jit, already sharded
    setup.train_step(state, batch) -> (state, metrics)   # state donated
    setup.eval_step(params, batch) -> metrics # eval capacity factor, no noise
    setup.abstract_state / setup.state_shardings  # ShapeDtypeStructs with shardings (Orbax)

    abstract_train_state(model_cfg, opt_cfg, partitioner) -> AbstractState
    batch_shapes(model_cfg, batch_size, (inputs, targets), sharding) -> {name: ShapeDtypeStruct}
    init_train_state(model_cfg, opt_cfg, partitioner, seed=0) -> TrainState
    make_train_step(model_cfg, opt_cfg, partitioner) -> train_step
    make_eval_step(model_cfg, partitioner) -> eval_step
    compute_loss(model_cfg, graphdef, params, batch, keys, train=) -> (loss, metrics)

`model_cfg` should come from `partitioner.adapt_model_config` (MoE groups split over the mesh).
Batches are dicts of [B, L] arrays with seqio feature-converter names; `decoder_loss_weights`
marks real target tokens (default: target != 0). Metrics are on-device scalars/small arrays:
loss = cross_entropy + z_loss + aux_loss + router_z_loss (the last three already scaled by their
coefficients), accuracy, num_tokens, learning_rate, grad_norm (train only), and per stack
'encoder/...' / 'decoder/...': aux_loss [layers] (unscaled, 1.0 = balanced), router_z_loss
[layers], expert_fraction [layers, E], fraction_dropped [layers], router_confidence [layers],
effective_capacity_factor (scalar).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from switch_jax.config.settings import OptimizerConfig
from switch_jax.models import routing
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.layers import Keys
from switch_jax.models.transformer import Transformer
from switch_jax.parallel.partitioning import BATCH_AXES, Partitioner
from switch_jax.training import losses, optimizer
from switch_jax.training.losses import compute_loss, token_sums  # noqa: F401 (part of this API)

DROPOUT_STREAM, JITTER_STREAM = 0, 1


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param (logical axes in metadata)
    opt_state: Any  # optimizer.adafactor state
    step: jax.Array  # int32 updates applied so far
    rng: jax.Array  # uint32[2] base key of dropout / jitter noise


class AbstractState(NamedTuple):
    graphdef: Any
    state: TrainState  # jax.ShapeDtypeStruct leaves carrying their target shardings
    shardings: TrainState  # NamedSharding leaves (same tree)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    model_cfg: ModelConfig
    abstract_state: TrainState
    state_shardings: TrainState
    init_state: Callable[[], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _make_tx(model_cfg, opt_cfg, abstract_params):
    return optimizer.adafactor(opt_cfg, optimizer.factor_layouts(abstract_params))


def _init_fn(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, tx=None):
    def init(seed_key):
        param_key, noise_key = jax.random.split(seed_key)
        model = Transformer(model_cfg, rngs=nnx.Rngs(params=param_key))
        _, params = nnx.split(model, nnx.Param)
        opt_state = tx.init(optimizer.values(params)) if tx is not None else None
        return TrainState(params, opt_state, jnp.zeros([], jnp.int32), noise_key)

    return init


def abstract_train_state(
    model_cfg: ModelConfig, opt_cfg: OptimizerConfig, partitioner: Partitioner
) -> AbstractState:
    """Shapes and target shardings of the whole train state, with nothing allocated."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(model, nnx.Param)
    tx = _make_tx(model_cfg, opt_cfg, abstract_params)
    # An abstract key: a concrete one would be placed on the active mesh, whose devices may
    # be compile-only (aot) or absent (AbstractMesh).
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    shapes = jax.eval_shape(_init_fn(model_cfg, opt_cfg, tx), key)
    opt_specs = optimizer.state_logical_specs(opt_cfg, abstract_params)
    shardings = TrainState(
        params=partitioner.param_shardings(shapes.params),
        opt_state=partitioner.logical_shardings(opt_specs, param=True),
        step=partitioner.replicated,
        rng=partitioner.replicated,
    )
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return AbstractState(graphdef, state, shardings)


def batch_shapes(
    model_cfg: ModelConfig,
    batch_size: int,
    lengths: tuple[int, int],
    sharding: NamedSharding | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes only of a packed batch (names as the pipeline and synthetic batches give them),
    for lowering a step without data; `lengths` is (inputs, targets), inputs unused when
    decoder-only."""
    inputs, targets = lengths
    features = ("input_tokens", "segment_ids", "positions")
    stacks = [("decoder", targets, (*features, "target_tokens", "loss_weights"))]
    if model_cfg.is_encoder_decoder:
        stacks.append(("encoder", inputs, features))
    return {
        f"{stack}_{name}": jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
        for stack, length, names in stacks
        for name in names
    }


def init_train_state(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    partitioner: Partitioner,
    seed: int = 0,
    *,
    abstract: AbstractState | None = None,
) -> TrainState:
    """Create parameters and optimizer state under jit straight into their shardings."""
    abstract = abstract or abstract_train_state(model_cfg, opt_cfg, partitioner)
    tx = _make_tx(model_cfg, opt_cfg, abstract.state.params)
    init = jax.jit(_init_fn(model_cfg, opt_cfg, tx), out_shardings=abstract.shardings)
    with partitioner.activate():
        return init(jax.random.PRNGKey(seed))


def _check_batch(model_cfg: ModelConfig, batch: dict, partitioner: Partitioner, k: int) -> None:
    """Trace-time checks for what would otherwise be silently replicated or mis-grouped."""
    shards = partitioner.batch_shards
    B = batch["decoder_input_tokens"].shape[0]
    if B % (shards * k):
        raise ConfigError(
            f"batch size {B} must be divisible by data x expert ({shards}) x "
            f"OptimizerConfig.microbatches ({k})"
        )
    if model_cfg.moe is None:
        return
    for name, tokens in batch.items():
        if not name.endswith("_input_tokens"):
            continue
        groups = routing.num_groups(
            tokens.size // k, model_cfg.moe.group_size, model_cfg.moe.num_expert_partitions
        )
        if groups % shards:
            raise ConfigError(
                f"{groups} MoE groups for {name} do not split over data x expert ({shards}): "
                f"build the model config with Partitioner.adapt_model_config"
            )


check_batch = _check_batch  # public: the planner (switch_jax.info) runs the step's checks too


# --- steps ----------------------------------------------------------------------------------


def _step_keys(rng, step, microbatch, rng_impl: str = "threefry") -> Keys:
    base = jax.random.fold_in(jax.random.fold_in(rng, step), microbatch)
    keys = Keys(
        dropout=jax.random.fold_in(base, DROPOUT_STREAM),
        jitter=jax.random.fold_in(base, JITTER_STREAM),
    )
    if rng_impl == "threefry":
        return keys
    # The state keeps its threefry key (checkpoints unchanged); the step's noise keys are
    # re-seeded from it for XLA's RngBitGenerator, much cheaper per draw on CPU.
    return Keys(
        *(
            jax.random.wrap_key_data(jax.random.bits(k, (4,), jnp.uint32), impl=rng_impl)
            for k in keys
        )
    )


def make_train_step(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    partitioner: Partitioner,
    *,
    abstract: AbstractState | None = None,
    skip_nonfinite: bool = False,
    objective: Callable | None = None,
    extra_shardings: tuple = (),
) -> Callable[..., tuple[TrainState, dict]]:
    """jit(train_step(state, batch, *extra)) with explicit shardings; the input state is donated.

    With `skip_nonfinite`, a step whose loss or gradient norm is not finite keeps the old params
    and optimizer state (decided in-graph, no host sync) and reports `skipped_updates` = 1.
    `objective(logits_BLV, microbatch, *extra, z_loss) -> sums` replaces the label cross-entropy
    (it must return `losses.token_sums`' keys plus `objective`, the sum to minimise); `extra` are
    further jit inputs with `extra_shardings`, not donated (e.g. a distillation teacher's params).
    """
    abstract = abstract or abstract_train_state(model_cfg, opt_cfg, partitioner)
    graphdef = abstract.graphdef
    tx = _make_tx(model_cfg, opt_cfg, abstract.state.params)
    schedule = optimizer.learning_rate_schedule(opt_cfg)
    k = opt_cfg.microbatches
    mesh = partitioner.mesh
    grads_sharding = optimizer.values(abstract.shardings.params)

    def step_fn(state: TrainState, batch: dict, *extra):
        _check_batch(model_cfg, batch, partitioner, k)
        weights = batch.get("decoder_loss_weights", batch["decoder_target_tokens"] > 0)
        # Normalise by the whole batch's real tokens so k microbatches sum to the full-batch loss.
        norm = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

        def loss_fn(params, microbatch, index):
            keys = _step_keys(state.rng, state.step, index, model_cfg.rng_impl)
            sums, router = losses.forward(
                graphdef,
                params,
                microbatch,
                keys,
                train=True,
                z_loss=model_cfg.z_loss,
                objective=objective,
                extra=extra,
            )
            m = losses.finish_metrics(sums, router, model_cfg)
            loss = (sums.get("objective", sums["cross_entropy"]) + sums["z_loss"]) / norm
            loss = loss + (m["aux_loss"] + m["router_z_loss"]) / k
            return loss, (sums, router)

        def grad_fn(params, microbatch, index):
            grads, aux = jax.grad(loss_fn, has_aux=True)(params, microbatch, index)
            return optimizer.values(grads), aux

        grads, (sums, router) = optimizer.accumulate_gradients(
            grad_fn,
            state.params,
            batch,
            k,
            split_constraint=NamedSharding(mesh, P(None, BATCH_AXES)),
            carry_sharding=grads_sharding,
        )
        sums = jax.tree.map(lambda x: jnp.sum(x, 0), sums)
        router = jax.tree.map(lambda x: jnp.mean(x, 0), router)
        updates, opt_state = tx.update(grads, state.opt_state, optimizer.values(state.params))
        new_values = optax.apply_updates(optimizer.values(state.params), updates)
        params = jax.tree.map(lambda v, x: v.replace(x), state.params, new_values, is_leaf=_is_var)
        metrics = losses.finish_metrics(sums, router, model_cfg)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            # step still advances: the data, noise keys and schedule stay aligned with the
            # trainer's step count whether or not an update was applied.
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(ok, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
            metrics["skipped_updates"] = 1.0 - ok.astype(jnp.float32)
        new_state = TrainState(params, opt_state, state.step + 1, state.rng)
        return new_state, metrics

    jitted = jax.jit(
        step_fn,
        in_shardings=(abstract.shardings, partitioner.batch_sharding, *extra_shardings),
        out_shardings=(abstract.shardings, partitioner.replicated),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: dict, *extra):
        with partitioner.activate():  # the model's constraints need mesh + rules at trace time
            return jitted(state, batch, *extra)

    train_step.jitted = jitted  # for .lower(...) / HLO inspection
    return train_step


def make_eval_step(
    model_cfg: ModelConfig,
    partitioner: Partitioner,
) -> Callable[[Any, dict], dict]:
    """jit(eval_step(params, batch) -> metrics): eval capacity factor, no dropout or jitter."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(model, nnx.Param)

    def eval_fn(params, batch):
        _check_batch(model_cfg, batch, partitioner, 1)
        return losses.compute_loss(model_cfg, graphdef, params, batch, train=False)[1]

    jitted = jax.jit(
        eval_fn,
        in_shardings=(partitioner.param_shardings(abstract_params), partitioner.batch_sharding),
        out_shardings=partitioner.replicated,
    )

    def eval_step(params, batch: dict) -> dict:
        with partitioner.activate():
            return jitted(params, batch)

    eval_step.jitted = jitted
    return eval_step


def setup_training(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    partitioner: Partitioner,
    *,
    seed: int = 0,
    skip_nonfinite: bool = False,
) -> TrainingSetup:
    """Everything the trainer needs, sharing one abstract state."""
    abstract = abstract_train_state(model_cfg, opt_cfg, partitioner)
    return TrainingSetup(
        model_cfg=model_cfg,
        abstract_state=abstract.state,
        state_shardings=abstract.shardings,
        init_state=lambda: init_train_state(
            model_cfg, opt_cfg, partitioner, seed, abstract=abstract
        ),
        train_step=make_train_step(
            model_cfg,
            opt_cfg,
            partitioner,
            abstract=abstract,
            skip_nonfinite=skip_nonfinite,
        ),
        eval_step=make_eval_step(model_cfg, partitioner),
    )
