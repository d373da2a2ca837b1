"""Pure training functions: the abstract model and state, state creation, jit-compiled train and
eval steps (no I/O); the loss rules are switch_jax.training.losses.

Public API:

    setup = setup_training(model_cfg, opt_cfg, partitioner, seed=0, objective=None)
    setup.init_state(seed=None) -> TrainState       # created under jit, already sharded
    setup.train_step(state, batch) -> (state, metrics)   # state donated
    setup.eval_step(params, batch) -> metrics # eval capacity factor, no noise
    setup.abstract_state / setup.state_shardings  # ShapeDtypeStructs with shardings (Orbax)
    setup.model                               # graph + abstract params (decoding, restoring)

    abstract_params(model_cfg, partitioner) -> AbstractParams      # the one abstract model
    abstract_train_state(model_cfg, opt_cfg, partitioner) -> AbstractState   # + optimizer
    batch_shapes(model_cfg, batch_size, (inputs, targets), sharding) -> {name: ShapeDtypeStruct}
    init_train_state(model_cfg, opt_cfg, partitioner, seed=0) -> TrainState
    make_train_step(model_cfg, opt_cfg, partitioner, objective=None) -> train_step
    make_eval_step(model_cfg, partitioner) -> eval_step
    compute_loss(model_cfg, graphdef, params, batch, keys, train=) -> (loss, metrics)

`model_cfg` should come from `partitioner.adapt_model_config` (MoE groups split over the mesh).
Batches are dicts of [B, L] arrays with seqio feature-converter names; `decoder_loss_weights`
marks real target tokens (losses.target_weights). Metrics are on-device scalars/small arrays:
loss = cross_entropy (or the objective) + z_loss + aux_loss + router_z_loss (the last three
already scaled by their coefficients), accuracy, num_tokens, learning_rate, grad_norm (train
only), and per stack 'encoder/...' / 'decoder/...': aux_loss [layers] (unscaled, 1.0 =
balanced), router_z_loss [layers], expert_fraction [layers, E], fraction_dropped [layers],
router_confidence [layers], effective_capacity_factor (scalar).
"""

from __future__ import annotations

import dataclasses
import functools
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
from switch_jax.models.size import abstract_model
from switch_jax.models.streams import KeyStream
from switch_jax.models.transformer import Transformer
from switch_jax.parallel.partitioning import BATCH_AXES, Partitioner
from switch_jax.training import losses, optimizer
from switch_jax.training.losses import compute_loss  # noqa: F401 (part of this API)


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param (logical axes in metadata)
    opt_state: Any  # optimizer.adafactor state
    step: jax.Array  # int32 updates applied so far
    rng: jax.Array  # uint32[2] base key of dropout / jitter noise


class AbstractParams(NamedTuple):
    """The model graph and its parameters' shapes, with nothing allocated."""

    graphdef: Any
    params: Any  # nnx.State of Params: ShapeDtypeStruct values carrying their target shardings
    shardings: Any  # NamedSharding leaves (same tree)


class AbstractState(NamedTuple):
    graphdef: Any
    state: TrainState  # jax.ShapeDtypeStruct leaves carrying their target shardings
    shardings: TrainState  # NamedSharding leaves (same tree)
    tx: optax.GradientTransformation  # the optimizer the state was shaped for


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything a run trains and evaluates with, built once from one abstract model."""

    model_cfg: ModelConfig
    model: AbstractParams
    abstract: AbstractState
    init_state: Callable[..., TrainState]  # (seed=None): a fresh state, the objective's start
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # objective inputs bound
    eval_step: Callable[[Any, dict], dict]
    objective: losses.Objective = losses.LABELS
    inputs: Callable[[], tuple] = tuple  # the objective's further step inputs (read once)

    @property
    def abstract_state(self) -> TrainState:
        return self.abstract.state

    @property
    def state_shardings(self) -> TrainState:
        return self.abstract.shardings

    @property
    def abstract_inputs(self) -> tuple:
        """ShapeDtypeStructs of `inputs()`: what lowering the train step without data needs."""
        return self.objective.abstract_inputs


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _init_fn(model_cfg: ModelConfig, tx):
    def init(seed_key):
        param_key, noise_key = jax.random.split(seed_key)
        model = Transformer(model_cfg, rngs=nnx.Rngs(params=param_key))
        _, params = nnx.split(model, nnx.Param)
        opt_state = tx.init(optimizer.values(params))
        return TrainState(params, opt_state, jnp.zeros([], jnp.int32), noise_key)

    return init


def _with_shardings(shapes, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def abstract_params(model_cfg: ModelConfig, partitioner: Partitioner) -> AbstractParams:
    """The model's graph and parameter shapes with their target shardings (no allocation)."""
    graphdef, params = nnx.split(abstract_model(model_cfg), nnx.Param)
    shardings = partitioner.param_shardings(params)
    return AbstractParams(graphdef, _with_shardings(params, shardings), shardings)


def abstract_train_state(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    partitioner: Partitioner,
    *,
    model: AbstractParams | None = None,
) -> AbstractState:
    """Shapes and target shardings of the whole train state, with nothing allocated; the
    optimizer is built here, once, for the state's parameters. `model`: abstract_params'."""
    model = model or abstract_params(model_cfg, partitioner)
    tx = optimizer.for_params(opt_cfg, model.params)
    opt_shapes = jax.eval_shape(tx.init, optimizer.values(model.params))
    opt_specs = optimizer.state_logical_specs(opt_cfg, model.params, opt_shapes)
    shardings = TrainState(
        params=model.shardings,
        opt_state=partitioner.logical_shardings(opt_specs, param=True),
        step=partitioner.replicated,
        rng=partitioner.replicated,
    )
    # The step counter and the noise key as _init_fn makes them: int32 [] and a uint32[2] key.
    shapes = TrainState(
        model.params,
        opt_shapes,
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    return AbstractState(model.graphdef, _with_shardings(shapes, shardings), shardings, tx)


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
    init = jax.jit(_init_fn(model_cfg, abstract.tx), out_shardings=abstract.shardings)
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
        dropout=jax.random.fold_in(base, KeyStream.DROPOUT),
        jitter=jax.random.fold_in(base, KeyStream.JITTER),
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
    objective: losses.Objective = losses.LABELS,
) -> Callable[..., tuple[TrainState, dict]]:
    """jit(train_step(state, batch, *inputs)) with explicit shardings; the state is donated.

    With `skip_nonfinite`, a step whose loss or gradient norm is not finite keeps the old params
    and optimizer state (decided in-graph, no host sync) and reports `skipped_updates` = 1.
    `objective` replaces the label cross-entropy; `inputs` are its further jit arguments
    (shardings from its abstract_inputs), not donated (e.g. a distillation teacher's params).
    """
    abstract = abstract or abstract_train_state(model_cfg, opt_cfg, partitioner)
    graphdef, tx = abstract.graphdef, abstract.tx
    schedule = optimizer.learning_rate_schedule(opt_cfg)
    k = opt_cfg.microbatches
    mesh = partitioner.mesh
    grads_sharding = optimizer.values(abstract.shardings.params)
    input_shardings = jax.tree.map(lambda x: x.sharding, objective.abstract_inputs)

    def step_fn(state: TrainState, batch: dict, *inputs):
        _check_batch(model_cfg, batch, partitioner, k)
        # Normalise by the whole batch's real tokens so k microbatches sum to the full-batch loss.
        tokens = jnp.maximum(jnp.sum(losses.target_weights(batch)), 1.0)

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
                inputs=inputs,
            )
            terms = losses.router_loss_terms(router, model_cfg)
            return losses.total_loss(sums, terms, tokens, k), (sums, router)

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
        if model_cfg.moe is not None and model_cfg.moe.loss_free:
            params = update_router_bias(graphdef, params, router, model_cfg.moe.bias_update_rate)
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
        in_shardings=(abstract.shardings, partitioner.batch_sharding, *input_shardings),
        out_shardings=(abstract.shardings, partitioner.replicated),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: dict, *inputs):
        with partitioner.activate():  # the model's constraints need mesh + rules at trace time
            return jitted(state, batch, *inputs)

    train_step.jitted = jitted  # for .lower(...) / HLO inspection
    return train_step


def update_router_bias(graphdef, params, router: dict, rate: float):
    """Loss-free balancing (DeepSeek-V3): every MoE layer's bias += rate * sign(mean load -
    load_e), load = this step's expert_fraction of that layer (chosen before capacity drops).
    An expert above the mean load loses choice priority, one below gains it."""
    model = nnx.merge(graphdef, params)
    for name in ("encoder", "decoder"):
        stack = getattr(model, name)
        if stack is None:
            continue
        fraction_LE = router[f"{name}/expert_fraction"]
        for mlp, rows in stack.moe_layers():
            load_E = fraction_LE[rows]
            error_E = jnp.mean(load_E, axis=-1, keepdims=True) - load_E
            mlp.router_bias[...] = mlp.router_bias[...] + rate * jnp.sign(error_E)
    return nnx.state(model, nnx.Param)


def make_eval_step(
    model_cfg: ModelConfig,
    partitioner: Partitioner,
    *,
    model: AbstractParams | None = None,
) -> Callable[[Any, dict], dict]:
    """jit(eval_step(params, batch) -> metrics): eval capacity factor, no dropout or jitter,
    label cross-entropy. `model`: abstract_params' (built here if not given)."""
    model = model or abstract_params(model_cfg, partitioner)

    def eval_fn(params, batch):
        _check_batch(model_cfg, batch, partitioner, 1)
        return losses.compute_loss(model_cfg, model.graphdef, params, batch, train=False)[1]

    jitted = jax.jit(
        eval_fn,
        in_shardings=(model.shardings, partitioner.batch_sharding),
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
    objective: losses.Objective = losses.LABELS,
) -> TrainingSetup:
    """Abstract model, optimizer, abstract state, init and steps, each built once; with an
    `objective`, its train step and starting params (its inputs are read at first use).

    Raises ConfigError when the objective's starting params do not fit the model (shapes only,
    before anything is allocated).
    """
    model = abstract_params(model_cfg, partitioner)
    abstract = abstract_train_state(model_cfg, opt_cfg, partitioner, model=model)
    step = make_train_step(
        model_cfg,
        opt_cfg,
        partitioner,
        abstract=abstract,
        skip_nonfinite=skip_nonfinite,
        objective=objective,
    )
    inputs = functools.cache(objective.load_inputs)
    train_step = step
    if objective.abstract_inputs:

        def train_step(state: TrainState, batch: dict):
            return step(state, batch, *inputs())

        train_step.jitted = step.jitted
    return TrainingSetup(
        model_cfg=model_cfg,
        model=model,
        abstract=abstract,
        init_state=_state_initialiser(model_cfg, partitioner, abstract, seed, objective, inputs),
        train_step=train_step,
        eval_step=make_eval_step(model_cfg, partitioner, model=model),
        objective=objective,
        inputs=inputs,
    )


def _state_initialiser(model_cfg, partitioner, abstract, default_seed, objective, inputs):
    """init_state(seed=None): fresh params and optimizer state, then the objective's start."""
    init = jax.jit(_init_fn(model_cfg, abstract.tx), out_shardings=abstract.shardings)
    start = objective.init_params
    if start is not None:
        # Shapes only: starting params that do not fit the model fail here, before any init.
        jax.eval_shape(start, abstract.state.params, *objective.abstract_inputs)
        start = jax.jit(start, out_shardings=abstract.shardings.params)

    def init_state(seed: int | None = None) -> TrainState:
        with partitioner.activate():
            state = init(jax.random.PRNGKey(default_seed if seed is None else seed))
            if start is not None:
                state = state._replace(params=start(state.params, *inputs()))
        return state

    return init_state
