"""Routing methods beyond Switch top-1: expert choice, Mesh TF top-2, loss-free balancing, and
per-token routing sown for analysis; each against a NumPy reference written here."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sharded_training import OPT, B, single_device, tiny_batch, tiny_config

from switch_jax.models import routing
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
from switch_jax.models.expert_choice import route_expert_choice
from switch_jax.models.layers import Keys
from switch_jax.models.moe import MoeLayer, RouterBias
from switch_jax.models.transformer import Transformer
from switch_jax.parallel import partitioning
from switch_jax.store import checkpoints
from switch_jax.training import steps


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits_and_mask(G=2, T=10, E=4, seed=0):
    rs = np.random.RandomState(seed)
    mask = np.ones((G, T), bool)
    mask[1, -4:] = False  # the second group has 6 real tokens
    return (2.0 * rs.randn(G, T, E)).astype(np.float32), mask


# ----------------------------------------------------------------------------- expert choice


def reference_expert_choice(logits, mask, capacity):
    """Per group and expert: its `capacity` most probable real tokens (rank = slot)."""
    G, T, E = logits.shape
    probs = _softmax(logits)
    kept = np.zeros((G, T, E), bool)
    slot = np.zeros((G, T, E), np.int64)
    for g in range(G):
        real = [t for t in range(T) if mask[g, t]]
        for e in range(E):
            ranked = sorted(real, key=lambda t: -probs[g, t, e])[:capacity]
            for c, t in enumerate(ranked):
                kept[g, t, e], slot[g, t, e] = True, c
    gate = np.where(kept, probs, 0.0)
    n_real = mask.sum()
    stats = dict(
        aux_loss=0.0,
        router_z_loss=(np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2)[mask].sum() / n_real,
        expert_fraction=kept.sum((0, 1)) / kept.sum(),
        fraction_dropped=(~kept.any(-1))[mask].sum() / n_real,
        router_confidence=gate.sum(-1)[mask].sum() / n_real,
        effective_capacity_factor=capacity * E / T,
    )
    return kept, slot, gate, stats


@pytest.mark.parametrize("capacity", [2, 8])  # 2: group 0 drops; 8: group 1 reaches padding
def test_expert_choice_equals_numpy_reference(capacity):
    logits, mask = _logits_and_mask()
    route, stats = jax.jit(route_expert_choice, static_argnames="capacity")(
        logits, mask, capacity=capacity
    )
    kept, slot, gate, want = reference_expert_choice(logits, mask, capacity)
    np.testing.assert_array_equal(np.asarray(route.kept_GTP), kept)
    np.testing.assert_array_equal(np.asarray(route.slot_GTP)[kept], slot[kept])
    np.testing.assert_array_equal(np.asarray(route.expert_GTP)[0, 0], np.arange(4))
    np.testing.assert_allclose(np.asarray(route.gate_GTP), gate, rtol=1e-6, atol=1e-7)
    for name, value in want.items():
        np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-5, err_msg=name)
    assert (want["fraction_dropped"] > 0) == (capacity == 2)


D, F, E = 8, 16, 4


def _moe_cfg(**moe) -> ModelConfig:
    settings = dict(num_experts=E, group_size=8, min_capacity=1, router_init_stddev=1.0)
    if moe.get("routing") == "expert_choice":
        settings["decoder_routing"] = "token_choice"
    moe = MoeConfig(**{**settings, **moe})
    return ModelConfig(d_model=D, d_ff=F, dtype="float32", moe=moe)


def _dense_reference(params, x, mask, kept):
    """y_t = sum over the experts e that took t of p_e(t) * FFN_e(x_t), for jax.grad; `kept`
    comes from the NumPy reference, so no dispatch code is shared."""
    x_TD = x.reshape(-1, D)
    probs = jax.nn.softmax(x_TD @ params["router"], -1) * kept.reshape(-1, E)
    h = jax.nn.relu(jnp.einsum("td,edf->tef", x_TD, params["wi"]))
    y = jnp.einsum("tef,efd,te->td", h, params["wo"], probs)
    return y.reshape(x.shape) * mask[..., None]


@pytest.mark.parametrize("dispatch", ["einsum", "scatter", "sorted"])
def test_expert_choice_layer_outputs_and_gradients(dispatch):
    # 16 tokens in 2 groups of 8, capacity round(0.5 * 8 / 4) = 1 per expert: drops happen.
    cfg = _moe_cfg(routing="expert_choice", dispatch=dispatch, capacity_factor_train=0.5)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    rs = np.random.RandomState(2)
    x = rs.randn(2, 8, D).astype(np.float32)
    mask = np.ones((2, 8), bool)
    mask[1, -2:] = False
    cot = rs.randn(2, 8, D).astype(np.float32)

    def loss(p, x):
        y, stats = nnx.merge(graphdef, p)(x, mask, Keys(), train=True)
        return jnp.sum(y * cot), (y, stats)

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    logits = (x.reshape(2, 8, D) @ np.asarray(params["router"][...])).astype(np.float32)
    kept, _, _, want = reference_expert_choice(logits, mask, capacity=1)
    assert want["fraction_dropped"] > 0
    np.testing.assert_allclose(stats.fraction_dropped, want["fraction_dropped"], rtol=1e-6)
    np.testing.assert_allclose(stats.expert_fraction, want["expert_fraction"], rtol=1e-6)
    plain = {k: params[k][...] for k in ("router", "wi", "wo")}

    def ref_loss(p, x):
        return jnp.sum(_dense_reference(p, x, mask, kept) * cot)

    ref_y = _dense_reference(plain, x, mask, kept)
    ref_grads = jax.grad(ref_loss, (0, 1))(plain, x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
    for name in ("router", "wi", "wo"):
        got, ref = np.asarray(grads[0][name][...]), np.asarray(ref_grads[0][name])
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=name)


BS, LS, DS, ES = 8, 8, 24, 12  # d_model and expert count no other dimension shares (HLO)


def _sharded_run(mesh_shape, dispatch):
    if mesh_shape == (1, 1, 1):
        p = single_device()
    else:
        p = partitioning.Partitioner(mesh_shape)
    moe = MoeConfig(
        num_experts=ES,
        group_size=8,
        min_capacity=1,
        routing="expert_choice",
        decoder_routing="token_choice",
        dispatch=dispatch,
    )
    cfg = p.adapt_model_config(ModelConfig(d_model=DS, d_ff=32, dtype="float32", moe=moe), BS)
    abstract = nnx.eval_shape(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rs = np.random.RandomState(1)
    params = jax.tree.map(lambda v: 0.3 * rs.randn(*v.shape).astype(np.float32), shapes)
    x, mask = rs.randn(BS, LS, DS).astype(np.float32), rs.rand(BS, LS) > 0.2
    params = jax.device_put(params, p.param_shardings(shapes))
    batch = p.shard_batch({"x": x, "mask": mask})

    def loss(params, x, mask):
        y, stats = nnx.merge(graphdef, params)(x, mask, Keys(), train=True)
        return jnp.sum(y * y), stats

    with p.activate():
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        out = jax.device_get(fn(params, batch["x"], batch["mask"]))
        hlo = fn.lower(params, batch["x"], batch["mask"]).compile().as_text()
    return out, hlo


@pytest.mark.parametrize("dispatch", ["scatter", "sorted"])
def test_expert_choice_sharded_equals_single_device_with_all_to_all(dispatch):
    (ref_loss, ref_stats), ref_grads = _sharded_run((1, 1, 1), dispatch)[0]
    ((loss, stats), grads), hlo = _sharded_run((2, 2, 2), dispatch)
    assert float(ref_stats.fraction_dropped) > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for name in ("wi", "wo", "router"):
        ref, got = np.asarray(ref_grads[name][...]), np.asarray(grads[name][...])
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert len(re.findall(r"all-to-all(-start)?\(", hlo)) >= 2, "no expert all-to-all"


def _refusal(architecture="encoder_decoder", scan=False, **moe):
    with pytest.raises(ConfigError) as e:
        ModelConfig(architecture=architecture, scan_layers=scan, moe=MoeConfig(**moe))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_settings_are_refused_where_they_do_not_apply():
    assert "decoder_routing='token_choice'" in _refusal(routing="expert_choice")
    only = _refusal("decoder_only", routing="expert_choice", decoder_routing="token_choice")
    assert "MoeConfig.routing='token_choice'" in only and "decoder_only" in only
    assert "dispatch='dropless'" in _refusal(routing="expert_choice", dispatch="dropless")
    assert "top_k" in _refusal(routing="expert_choice", top_k=2, decoder_routing="token_choice")
    assert "load_balancing" in _refusal(
        routing="expert_choice", decoder_routing="token_choice", load_balancing="loss_free"
    )
    assert "top_k=2" in _refusal(routing="mesh_tf_top2")
    assert "mesh_tf_top2" in _refusal(second_expert_policy_train="all")
    assert "scan_layers" in _refusal(sow_routing=True, scan=True)
    ok = MoeConfig(routing="expert_choice", decoder_routing="token_choice")
    cfg = ModelConfig(moe=ok)
    assert (cfg.moe.stack_routing(False), cfg.moe.stack_routing(True)) == (
        "expert_choice",
        "token_choice",
    )


# ----------------------------------------------------------------------------- Mesh TF top-2


def reference_mesh_tf_top2(logits, mask, uniform, capacity, policy, threshold=0.2):
    """Mesh TF `_top_2_gating`: renormalised gates, second pick per policy, first picks take
    slots before second picks, density_1 (first picks) in the aux loss."""
    G, T, E = logits.shape
    probs = _softmax(logits)
    top = np.argsort(-probs, -1, kind="stable")[..., :2]
    raw = np.take_along_axis(probs, top, -1)
    gate = raw / (raw.sum(-1, keepdims=True) + 1e-9)
    use2 = {
        "all": np.ones((G, T), bool),
        "none": np.zeros((G, T), bool),
        "threshold": gate[..., 1] > threshold,
        "random": uniform < gate[..., 1] / threshold,
    }[policy]
    wants = np.stack([mask, mask & use2], -1)
    kept = np.zeros_like(wants)
    for g in range(G):
        used = np.zeros(E, int)
        for k in range(2):
            for t in range(T):
                if wants[g, t, k]:
                    kept[g, t, k] = used[top[g, t, k]] < capacity
                    used[top[g, t, k]] += 1
    f = np.stack([np.bincount(top[g, mask[g], 0], minlength=E) / mask[g].sum() for g in range(G)])
    p = np.stack([probs[g, mask[g]].mean(0) for g in range(G)])
    return top, kept, np.where(kept, gate, 0.0), E * np.mean((f * p).sum(-1)), wants


@pytest.mark.parametrize("policy", ["random", "threshold", "all", "none"])
def test_mesh_tf_top2_equals_numpy_reference_given_the_draws(policy):
    logits, mask = _logits_and_mask(T=12, seed=3)
    uniform = np.random.RandomState(4).rand(*mask.shape).astype(np.float32)

    @jax.jit
    def run(logits, uniform):
        second = routing.SecondExpert(policy, 0.2, uniform)
        return routing.route(logits, mask, top_k=2, capacity=3, second=second)

    route, stats = run(logits, uniform)
    top, kept, gate, aux, wants = reference_mesh_tf_top2(logits, mask, uniform, 3, policy)
    np.testing.assert_array_equal(np.asarray(route.expert_GTP), top)
    np.testing.assert_array_equal(np.asarray(route.kept_GTP), kept)
    np.testing.assert_allclose(np.asarray(route.gate_GTP), gate, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.aux_loss, aux, rtol=1e-5)
    dropped = (wants & ~kept).sum() / wants.sum()
    np.testing.assert_allclose(stats.fraction_dropped, dropped, rtol=1e-6)
    if policy == "random":  # the case must keep some second picks and skip others
        assert 0 < kept[..., 1].sum() and (mask & ~wants[..., 1]).sum() > 0


def test_mesh_tf_top2_layer_samples_in_train_and_repeats_in_eval():
    cfg = _moe_cfg(routing="mesh_tf_top2", top_k=2, capacity_factor_eval=4.0)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    x = np.random.RandomState(5).randn(2, 8, D).astype(np.float32)
    mask = np.ones((2, 8), bool)
    graphdef, state = nnx.split(layer)
    run = jax.jit(
        lambda s, k, t: nnx.merge(graphdef, s)(x, mask, Keys(jitter=k), train=t)[0],
        static_argnums=2,
    )
    eval_a, eval_b = run(state, None, False), run(state, None, False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = [run(state, jax.random.PRNGKey(i), True) for i in range(2)]
    assert not np.allclose(train[0], train[1]), "different keys, same second-expert draws"


# ----------------------------------------------------------------------------- loss-free


def _collapsed_state(s, cfg):
    """Every token to expert 0: a constant embedding dimension the router reads alone."""
    state = jax.device_get(s.init_state())
    emb = state.params["token_embedder"]["embedding"]
    emb.set_value(np.asarray(emb.get_value()) + np.eye(1, cfg.d_model, 0, np.float32) * 5.0)
    router = np.zeros((cfg.d_model, cfg.moe.num_experts), np.float32)
    router[0, 0] = 1.0
    router[1:, 1:] = 0.3 * np.random.RandomState(0).randn(cfg.d_model - 1, 3)
    state.params["decoder"]["blocks"][1]["layers"][0]["mlp"]["router"].set_value(router)
    return state


RATE, STEPS = 0.1, 30


def _train(balancing, num_steps, *, tmp_path=None):
    p = single_device()
    moe = dataclasses.replace(
        tiny_config("decoder_only").moe,
        jitter_eps=0.0,
        aux_loss_coef=0.0,
        load_balancing=balancing,
        bias_update_rate=RATE,
    )
    cfg = p.adapt_model_config(tiny_config("decoder_only").replace(moe=moe), B)
    s = steps.setup_training(cfg, OPT, p)
    state = jax.device_put(_collapsed_state(s, cfg), s.state_shardings)
    batch = p.shard_batch(tiny_batch("decoder_only"))
    history = []
    for _ in range(num_steps):
        state, metrics = s.train_step(state, batch)
        history.append(np.asarray(metrics["decoder/expert_fraction"])[0])
    return s, jax.device_get(state), batch, history


@pytest.fixture(scope="module")
def loss_free_run():
    return _train("loss_free", STEPS)


def test_loss_free_bias_balances_a_collapsed_router(loss_free_run):
    _, _, _, without = _train("aux_loss", STEPS)
    *_, history = loss_free_run
    assert history[0][0] == 1.0 and without[0][0] == 1.0, "the start must be collapsed"
    assert without[-1].max() > 0.9, "collapsed router balanced itself without the bias"
    # Balanced (0.25 each) up to the sign rule's oscillation over the last five steps.
    assert np.max(history[-5:]) < 0.35, f"bias did not balance: {history[-5:]}"


def _bias(params):
    return params["decoder"]["blocks"][1]["layers"][0]["mlp"]["router_bias"]


def test_bias_is_moved_by_the_sign_rule_only(loss_free_run):
    s, host, batch, _ = loss_free_run
    state = jax.device_put(host, s.state_shardings)
    assert isinstance(_bias(state.params), RouterBias)
    before = np.asarray(_bias(state.params)[...])
    state, metrics = s.train_step(state, batch)
    load = np.asarray(metrics["decoder/expert_fraction"])[0]
    want = before + RATE * np.sign(load.mean() - load)
    np.testing.assert_allclose(np.asarray(_bias(state.params)[...]), want, rtol=1e-6)


def test_bias_is_sharded_with_the_experts():
    p = partitioning.Partitioner((2, 2, 2))
    moe = dataclasses.replace(tiny_config("decoder_only").moe, load_balancing="both")
    cfg = p.adapt_model_config(tiny_config("decoder_only").replace(moe=moe), B)
    abstract = steps.abstract_params(cfg, p)
    assert _bias(abstract.shardings).spec == jax.P("expert")


def test_bias_survives_save_and_restore_exactly(loss_free_run, tmp_path):
    s, host, batch, _ = loss_free_run
    state = jax.device_put(host, s.state_shardings)
    ckpts = checkpoints.Checkpoints(str(tmp_path), period=1, keep=1, async_save=False)
    ckpts.save(7, state, force=True)
    ckpts.wait()
    restored, _ = ckpts.restore(7, s.abstract_state)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(jax.device_get(restored)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(_bias(host.params)[...])).max() > 0
    ckpts.close()


# ----------------------------------------------------------------------------- sown routing


def test_sown_routing_matches_the_statistics_and_leaves_outputs_unchanged():
    moe = MoeConfig(num_experts=4, group_size=16, min_capacity=1, routing="expert_choice")
    moe = dataclasses.replace(moe, decoder_routing="token_choice")
    cfg = tiny_config().replace(moe=moe)
    batch = tiny_batch()
    plain = Transformer(cfg, rngs=nnx.Rngs(0))
    sowing = Transformer(
        cfg.replace(moe=dataclasses.replace(moe, sow_routing=True)), rngs=nnx.Rngs(0)
    )
    forward = nnx.jit(lambda m, b: nnx.capture(m, nnx.Intermediate)(b, train=False))
    (logits, _), nothing = forward(plain, batch)
    (sown_logits, stats), sown = forward(sowing, batch)
    np.testing.assert_array_equal(logits, sown_logits)
    for stack, P in (("encoder", 4), ("decoder", 1)):
        (route,) = sown[stack]["blocks"][1]["layers"][0]["mlp"]["routing"]
        assert route.expert_BLP.shape == (B, 8, P)
        kept, gate = np.asarray(route.kept_BLP), np.asarray(route.gate_BLP)
        assert np.all(gate[~kept] == 0) and np.all(gate[kept] > 0)
        share = kept.sum((0, 1)) if P == 4 else np.bincount(route.expert_BLP[kept], minlength=4)
        fraction = np.asarray(stats[stack].expert_fraction[0])
        if P == 4:  # expert choice: the share of taken (token, expert) pairs
            np.testing.assert_allclose(share / share.sum(), fraction, rtol=1e-6)
        else:  # token choice: kept picks, a subset of the chosen ones the fractions count
            assert 0 < share.sum() <= B * 8
    assert not nothing, "sown without the flag"
    assert not nnx.state(sowing, nnx.Intermediate), "the model keeps what was captured"
