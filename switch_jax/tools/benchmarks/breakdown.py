"""Where the Switch step's extra time goes: each sparse FFN (fwd+bwd, with its noise) against
the dense FFN it replaces, at the run's real token counts, and the optimizer update over the
Switch parameters against the dense twin's. Timed interleaved, wall and process CPU.

Legend: N tokens, D d_model.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import Keys, Mlp
from switch_jax.models.moe import MoeLayer
from switch_jax.tools.benchmarks import timing
from switch_jax.training import optimizer, steps


def _noise_keys(cfg: ModelConfig) -> Keys:
    # The step's own noise with the run's PRNG: on CPU the threefry draws for jitter and dropout
    # are a visible share of the Switch layer's cost, so leaving them out would hide it.
    key = jax.random.key(0, impl="threefry2x32" if cfg.rng_impl == "threefry" else cfg.rng_impl)
    return Keys(dropout=jax.random.fold_in(key, 1), jitter=jax.random.fold_in(key, 2))


def _ffn_step(cfg: ModelConfig, tokens: int, sparse: bool):
    """jitted fwd+bwd of one FFN (Switch layer or dense Mlp) on [1, tokens, D] with noise."""
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0)) if sparse else Mlp(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    x_BLD = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, cfg.d_model)).astype(cfg.dtype)
    mask_BL = jnp.ones((1, tokens), bool)

    def loss(params, x_BLD, keys):
        module = nnx.merge(graphdef, params)
        if sparse:
            y, stats = module(x_BLD, mask_BL, keys, train=True)
            return jnp.sum(y.astype(jnp.float32)) + stats.aux_loss
        return jnp.sum(module(x_BLD, keys).astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x_BLD, _noise_keys(cfg))
    compiled = fn.compile()
    args = (params, x_BLD, _noise_keys(cfg))
    return lambda: compiled(*args)


def _optimizer_step(setup: steps.TrainingSetup, partitioner):
    """jitted Adafactor update + apply over the model's parameters (gradients = params), with
    the optimizer and state of `setup` (a run's, or its dense twin's).

    The update's cost depends only on the shapes of the gradients, so the parameters stand in
    for them and no backward pass is needed.
    """
    tx = setup.abstract.tx
    state = setup.init_state(0)
    values = optimizer.values(state.params)

    @jax.jit
    def update(values, opt_state):
        updates, opt_state = tx.update(values, opt_state, values)
        return jax.tree.map(jnp.add, values, updates), opt_state

    with partitioner.activate():
        jax.block_until_ready(update(values, state.opt_state))
    return lambda: update(values, state.opt_state)


def bench_breakdown(configs, repeats: int) -> dict:
    """Per piece: Switch and dense medians (wall, CPU), and the step-time delta they predict."""
    from switch_jax.training import build  # noqa: PLC0415

    built = build.build_run(configs)
    model_cfg, partitioner, lens = built.model_cfg, built.partitioner, built.lengths
    opt_cfg, batch = configs.optimizer, configs.data.batch_size
    pieces = {}
    dense_cfg = model_cfg.replace(moe=None)
    stacks = [("encoder", lens[0]), ("decoder", lens[1])] if lens[0] else [("decoder", lens[1])]
    for stack, length in stacks:
        # Each FFN sees every token of its stack at once, as in the step: batch x length tokens.
        n = batch * length
        pieces[f"{stack}_ffn_{n}_tokens"] = (
            _ffn_step(model_cfg, n, True),
            _ffn_step(dense_cfg, n, False),
            sum(model_cfg.is_sparse(i) for i in range(_depth(model_cfg, stack))),
        )
    with partitioner.activate():
        dense = steps.setup_training(dense_cfg, opt_cfg, partitioner)
    pieces["optimizer"] = (
        _optimizer_step(built.setup, partitioner),
        _optimizer_step(dense, partitioner),
        1,
    )
    fns = [f for switch, dense, _ in pieces.values() for f in (switch, dense)]
    wall, cpu = timing.interleaved(fns, repeats)
    out, predicted_wall, predicted_cpu = {}, 0.0, 0.0
    for i, (name, (_, _, count)) in enumerate(pieces.items()):
        sw, dw = statistics.median(wall[2 * i]), statistics.median(wall[2 * i + 1])
        sc, dc = statistics.median(cpu[2 * i]), statistics.median(cpu[2 * i + 1])
        out[name] = {"count": count, "switch_s": sw, "dense_s": dw, "switch_cpu_s": sc}
        out[name]["dense_cpu_s"] = dc
        predicted_wall += count * (sw - dw)
        predicted_cpu += count * (sc - dc)
    out["predicted_step_delta_s"] = predicted_wall
    out["predicted_step_delta_cpu_s"] = predicted_cpu
    return out


def _depth(cfg: ModelConfig, stack: str) -> int:
    return cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
