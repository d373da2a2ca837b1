"""Switch layer: both dispatches against each other and against a per-token NumPy loop."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
from switch_jax.models.layers import Keys
from switch_jax.models.moe import MoeLayer
from switch_jax.training import steps
from tests.model_fixtures import forward, make_model, random_batch, tiny_config

B, L, D, F, E = 2, 8, 8, 16, 4  # 16 tokens -> 2 groups of T = 8
NO_NOISE = Keys()


def moe_config(dtype="float32", activation="relu", **moe) -> ModelConfig:
    settings = dict(
        num_experts=E,
        group_size=8,
        min_capacity=1,
        capacity_factor_train=1.0,  # C = round(1.0 * 8 / 4) = 2: drops tokens
        capacity_factor_eval=4.0,  # C = 8 = T: never drops
        router_init_stddev=1.0,  # confident, varied routing
    )
    settings.update(moe)
    return ModelConfig(
        d_model=D, d_ff=F, activation=activation, dtype=dtype, moe=MoeConfig(**settings)
    )


def make_layer(cfg: ModelConfig, seed: int = 0) -> MoeLayer:
    return MoeLayer(cfg, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _apply(graphdef, state, x, mask, keys, train):
    return nnx.merge(graphdef, state)(x, mask, keys, train=train)


def apply(layer, x, mask=None, *, train, keys=NO_NOISE):
    graphdef, state = nnx.split(layer)
    mask = np.ones(x.shape[:2], bool) if mask is None else mask
    return _apply(graphdef, state, x, mask, keys, train)


def inputs(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    mask = np.ones((B, L), bool)
    mask[1, -3:] = False  # padding at the end of the second sequence
    return jnp.asarray(x, dtype), mask


def numpy_params(layer: MoeLayer) -> dict[str, np.ndarray]:
    names = ["router", "wi", "wo"] + (["wi_gate"] if layer.wi_gate is not None else [])
    return {n: np.asarray(getattr(layer, n)[...], np.float64) for n in names}


def _gelu(x):  # tanh approximation, as flax / T5X
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_layer(p, x, mask, top_k=1):
    """Per-token loop with capacity >= tokens: y = sum over the top-k e of p_e(x) expert_e(x)."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        if not mask.reshape(-1)[t]:
            continue
        logits = xt @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for e in np.argsort(-probs)[:top_k]:
            h = xt @ p["wi"][e]
            h = _gelu(xt @ p["wi_gate"][e]) * h if "wi_gate" in p else np.maximum(h, 0)
            out[t] += probs[e] * (h @ p["wo"][e])
    return out.reshape(B, L, D)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("activation, top_k", [("relu", 1), ("geglu", 1), ("relu", 2)])
@pytest.mark.parametrize("dispatch", ["einsum", "scatter"])
def test_layer_equals_per_token_loop_when_nothing_drops(activation, top_k, dispatch):
    layer = make_layer(moe_config(activation=activation, dispatch=dispatch, top_k=top_k))
    x, mask = inputs()
    y, stats = apply(layer, x, mask, train=False)  # eval capacity factor 4.0: C = T
    assert float(stats.fraction_dropped) == 0.0
    want = reference_layer(numpy_params(layer), x, mask, top_k)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(y)[~mask] == 0.0), "padding tokens are not routed"
    chosen = np.argmax(np.asarray(x).reshape(-1, D) @ numpy_params(layer)["router"], -1)
    assert len(set(chosen[mask.reshape(-1)])) >= 3, "the case must use several experts"


def _loss_and_grads(layer, x, mask, cotangent, keys=None):
    graphdef, state = nnx.split(layer)
    keys = Keys() if keys is None else keys

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x, mask, keys, train=True)
        return jnp.sum(y.astype(jnp.float32) * cotangent) + stats.aux_loss, (y, stats)

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state, x
    )
    return y, stats, grads


@pytest.mark.parametrize(
    "activation, top_k, prioritized",
    [("relu", 1, False), ("geglu", 1, False), ("relu", 2, False), ("relu", 2, True)],
)
def test_einsum_and_scatter_agree_on_outputs_and_gradients(activation, top_k, prioritized):
    x, mask = inputs(1)
    cotangent = np.random.default_rng(2).standard_normal((B, L, D)).astype(np.float32)
    results = {}
    for dispatch in ("einsum", "scatter"):
        cfg = moe_config(
            activation=activation,
            dispatch=dispatch,
            top_k=top_k,
            batch_prioritized_routing=prioritized,
        )
        layer = make_layer(cfg, seed=3)
        results[dispatch] = _loss_and_grads(layer, x, mask, cotangent)
    (y1, s1, (gp1, gx1)), (y2, s2, (gp2, gx2)) = results["einsum"], results["scatter"]
    assert float(s1.fraction_dropped) > 0, "train capacity must drop tokens in this case"
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-6)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx2), rtol=1e-5, atol=1e-6)
    flat1, flat2 = dict(nnx.to_flat_state(gp1)), dict(nnx.to_flat_state(gp2))
    assert flat1.keys() == flat2.keys()
    assert len(flat1) == (4 if activation == "geglu" else 3)
    for path in flat1:
        g1, g2 = np.asarray(flat1[path][...]), np.asarray(flat2[path][...])
        assert np.abs(g1).max() > 0, path
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_einsum_and_scatter_agree_in_bfloat16():
    x, mask = inputs(4, jnp.bfloat16)
    ys = [
        np.asarray(
            apply(make_layer(moe_config("bfloat16", dispatch=d), 5), x, mask, train=True)[0],
            np.float32,
        )
        for d in ("einsum", "scatter")
    ]
    assert ys[0].dtype == np.float32 and np.abs(ys[0]).max() > 0
    np.testing.assert_allclose(ys[0], ys[1], rtol=2e-2, atol=2e-2 * np.abs(ys[0]).max())


@pytest.mark.parametrize(
    "dispatch, dtype",
    [(d, t) for d in ("einsum", "scatter") for t in ("float32", "bfloat16")]
    + [("sorted", "bfloat16")],
)
def test_dropped_token_output_is_exactly_zero(dispatch, dtype):
    layer = make_layer(moe_config(dtype, dispatch=dispatch))
    # Every token prefers expert 0 (feature 0 is positive and only it reaches the router), so
    # with capacity 2 per group of 8 the first 2 tokens of each group are kept, the rest dropped.
    router = np.zeros((D, E), np.float32)
    router[0, 0] = 5.0
    layer.router[...] = jnp.asarray(router)
    x = np.array(inputs(6)[0])
    x[..., 0] = np.abs(x[..., 0]) + 0.5
    y, stats = apply(layer, jnp.asarray(x, dtype), train=True)
    y = np.asarray(y, np.float32).reshape(2, 8, D)  # [G, T, D]
    assert np.all(np.abs(y[:, :2]).sum(-1) > 0)
    assert np.all(y[:, 2:] == 0.0)
    np.testing.assert_allclose(float(stats.fraction_dropped), 6 / 8)
    np.testing.assert_allclose(np.asarray(stats.expert_fraction), [1, 0, 0, 0])


# ----------------------------------------------------------------------------- router gradient


@pytest.mark.parametrize("dispatch", ["einsum", "scatter", "sorted", "dropless"])
def test_router_gets_the_gate_gradient_from_the_main_loss(dispatch):
    layer = make_layer(moe_config(dispatch=dispatch))
    x, mask = inputs(7)
    c = np.random.default_rng(8).standard_normal((B, L, D))
    graphdef, state = nnx.split(layer)

    def main_loss(state):  # no aux loss: only the gate can carry gradient to the router
        y, _ = nnx.merge(graphdef, state)(x, mask, Keys(), train=False)
        return jnp.sum(y * c)

    grads = jax.jit(jax.grad(main_loss))(state)
    got = np.asarray(grads["router"][...])
    assert np.abs(got).max() > 1e-3
    # Reference: L = sum_t c_t . p_e(x_t) E_e(x_t) -> dL/dlogit_t = (c_t . E_e(x_t)) dp_e/dlogit.
    p = numpy_params(layer)
    xs = np.asarray(x, np.float64).reshape(-1, D)
    want = np.zeros((D, E))
    for t, xt in enumerate(xs):
        if not mask.reshape(-1)[t]:
            continue
        logits = xt @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        e = int(np.argmax(probs))
        expert_out = np.maximum(xt @ p["wi"][e], 0) @ p["wo"][e]
        s = c.reshape(-1, D)[t] @ expert_out
        want += np.outer(xt, s * probs[e] * (np.eye(E)[e] - probs))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dispatch", ["scatter"])
def test_router_float32_experts_bfloat16(dispatch):
    # The paper's selective precision. (The fused FFN of 'sorted' on CPU computes its blocks in
    # float32, a CPU speed choice: test_fused_ffn_keeps_bfloat16_activations.)
    layer = make_layer(moe_config("bfloat16", dispatch=dispatch))
    x, mask = inputs(9, jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: layer(x, mask, Keys(), train=False))(x)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    router = [e for e in dots if e.outvars[0].aval.shape[-1] == E]
    expert = [e for e in dots if e.outvars[0].aval.shape[-1] in (D, F)]
    assert router and expert
    for eqn in router:
        assert all(v.aval.dtype == jnp.float32 for v in (*eqn.invars, *eqn.outvars)), eqn
    for eqn in expert:
        assert eqn.outvars[0].aval.dtype == jnp.bfloat16, eqn
    y, stats = apply(layer, x, mask, train=False)
    assert y.dtype == jnp.bfloat16 and stats.aux_loss.dtype == jnp.float32


def test_fused_ffn_keeps_bfloat16_activations():
    layer = make_layer(moe_config("bfloat16", dispatch="sorted", grouped_matmul="fused"))
    x, mask = inputs(9, jnp.bfloat16)
    y, stats = apply(layer, x, mask, train=True)
    assert y.dtype == jnp.bfloat16 and stats.aux_loss.dtype == jnp.float32
    ref, _ = apply(make_layer(moe_config("bfloat16", dispatch="scatter")), x, mask, train=True)
    # float32 blocks vs bfloat16 matmuls: equal to bfloat16 rounding.
    np.testing.assert_allclose(np.float32(y), np.float32(ref), rtol=0.05, atol=0.02)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _equations(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _equations(sub)


# ----------------------------------------------------------------------------- noise


def test_jitter_only_in_training_with_a_key_and_only_on_the_router_input():
    cfg = moe_config(jitter_eps=1e-3, capacity_factor_train=4.0)
    layer = make_layer(cfg)
    x, mask = inputs(10)
    jitter = Keys(jitter=jax.random.key(1))
    clean, s_clean = apply(layer, x, mask, train=True)
    noisy, s_noisy = apply(layer, x, mask, train=True, keys=jitter)
    assert float(s_clean.router_z_loss) != float(s_noisy.router_z_loss)
    # Eval never jitters, even when given a key.
    ev, s_ev = apply(layer, x, mask, train=False)
    ev_key, s_ev_key = apply(layer, x, mask, train=False, keys=jitter)
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(ev_key))
    np.testing.assert_array_equal(
        np.asarray(s_ev.router_z_loss), np.asarray(s_ev_key.router_z_loss)
    )
    # The experts see the clean input: per token, jitter only rescales the output by the ratio
    # of gates (same expert, eps small), so noisy / clean is constant along d_model.
    clean, noisy = np.asarray(clean)[mask], np.asarray(noisy)[mask]
    ratio = noisy / clean
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)
    assert np.abs(ratio - 1).max() > 1e-6
    assert np.abs(ratio - 1).max() < 0.05
    # A zero epsilon with a key changes nothing.
    layer0 = make_layer(moe_config(capacity_factor_train=4.0))
    a, _ = apply(layer0, x, mask, train=True)
    b, _ = apply(layer0, x, mask, train=True, keys=jitter)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_dropout_is_its_own_knob():
    x, mask = inputs(11)
    key = Keys(dropout=jax.random.key(2))
    # dropout_rate = 0 and expert dropout on: the expert hidden is dropped in training.
    layer = make_layer(moe_config(expert_dropout_rate=0.4))
    assert layer.cfg.dropout_rate == 0.0
    off, _ = apply(layer, x, mask, train=True)
    on, _ = apply(layer, x, mask, train=True, keys=key)
    assert not np.allclose(np.asarray(off), np.asarray(on))
    # Dropout only inside the experts: routing and the zero output of unrouted tokens stay.
    assert np.all(np.asarray(on)[~mask] == 0.0)
    # Ordinary dropout does not reach inside the experts.
    dense_only = make_layer(moe_config().replace(dropout_rate=0.5))
    a, _ = apply(dense_only, x, mask, train=True)
    b, _ = apply(dense_only, x, mask, train=True, keys=key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- grouping


def test_layer_raises_config_error_when_tokens_cannot_be_grouped():
    layer = make_layer(moe_config(num_expert_partitions=4, group_size=4))
    x = np.zeros((1, 6, D), np.float32)
    with pytest.raises(ConfigError, match="group_size"):
        layer(x, np.ones((1, 6), bool), Keys(), train=False)


def test_groups_route_independently():
    # Group = 8 consecutive tokens: shuffling tokens inside group 2 never changes group 1.
    layer = make_layer(moe_config())
    x = np.array(inputs(12)[0])
    y1, _ = apply(layer, x, train=True)
    x2 = x.copy()
    x2[1] = x[1, ::-1]
    y2, _ = apply(layer, x2, train=True)
    np.testing.assert_array_equal(np.asarray(y1)[0], np.asarray(y2)[0])
    assert not np.array_equal(np.asarray(y1)[1], np.asarray(y2)[1])


# ----------------------------------------------------------------------------- decoder, losses


def _bpr_model():
    moe = MoeConfig(
        num_experts=4,
        group_size=16,
        min_capacity=1,
        capacity_factor_train=0.5,  # C = 2 of 16 tokens per expert: most tokens drop
        router_init_stddev=1.0,
        batch_prioritized_routing=True,
    )
    cfg = tiny_config(moe=moe)
    return cfg, make_model(cfg, seed=3)


def test_decoder_ignores_batch_prioritized_routing():
    cfg, model = _bpr_model()
    enc_layer = model.encoder.blocks[1].layers[0].mlp
    dec_layer = model.decoder.blocks[1].layers[0].mlp
    assert enc_layer.moe.batch_prioritized_routing and not dec_layer.moe.batch_prioritized_routing
    batch = random_batch(cfg, batch=2, length=8, seed=4)
    base, stats = forward(model, batch, train=True)
    assert float(stats["decoder"].fraction_dropped[0]) > 0.3
    rng = np.random.default_rng(5)
    for i in (0, 3, 6):  # later tokens of the group's last sequence change
        changed = {k: v.copy() for k, v in batch.items()}
        changed["decoder_input_tokens"][1, i + 1 :] = rng.integers(2, cfg.vocab_size, 7 - i)
        logits, _ = forward(model, changed, train=True)
        np.testing.assert_array_equal(np.asarray(logits)[1, : i + 1], np.asarray(base)[1, : i + 1])
        np.testing.assert_array_equal(np.asarray(logits)[0], np.asarray(base)[0])
    # The encoder does prioritise: the same parameters without it give other outputs (and the
    # decoder routes alike in both, so the difference comes from the encoder).
    plain = cfg.replace(moe=dataclasses.replace(cfg.moe, batch_prioritized_routing=False))
    plain_logits, _ = forward(_with_cfg(model, plain), batch, train=True)
    assert not np.allclose(np.asarray(plain_logits), np.asarray(base))
    with pytest.raises(ConfigError, match="decoder_only"):
        cfg.replace(architecture="decoder_only")


def _with_cfg(model, cfg):
    other = make_model(cfg, seed=3)
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aux_loss_reduction_over_layers(reduction):
    cfg = tiny_config(num_encoder_layers=4, num_decoder_layers=2)  # 2 + 1 sparse layers
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, aux_loss_reduction=reduction))
    graphdef, params = nnx.split(make_model(cfg), nnx.Param)
    batch = random_batch(cfg, seed=6)
    fn = jax.jit(lambda p: steps.compute_loss(cfg, graphdef, p, batch, train=True)[1])
    m = jax.device_get(fn(params))
    per_layer = np.concatenate([m["encoder/aux_loss"], m["decoder/aux_loss"]])
    assert per_layer.shape == (3,) and np.all(per_layer > 0.5)
    want = per_layer.sum() if reduction == "sum" else per_layer.mean()
    np.testing.assert_allclose(m["aux_loss"], cfg.moe.aux_loss_coef * want, rtol=1e-6)
    with pytest.raises(ConfigError, match="aux_loss_reduction"):
        MoeConfig(aux_loss_reduction="max")


def test_layer_noise_keys_are_the_two_fold_ins():
    # The layer's own keys: its FFN keys folded with the MoE streams, None where that noise is off.
    from switch_jax.models.streams import MoeStream  # noqa: PLC0415

    layer = make_layer(moe_config(expert_dropout_rate=0.1))
    keys = Keys(dropout=jax.random.key(3), jitter=jax.random.key(4))
    got = jax.jit(lambda k: layer._noise_keys(k, train=True))(keys)
    want = (
        jax.random.fold_in(keys.dropout, MoeStream.EXPERT_DROPOUT),
        jax.random.fold_in(keys.jitter, MoeStream.JITTER),
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(jax.random.key_data(g), jax.random.key_data(w))
    assert layer._noise_keys(keys, train=False).jitter is None
    off = make_layer(moe_config(expert_dropout_rate=0.0))._noise_keys(keys, train=True)
    assert off.dropout is None and off.jitter is not None
