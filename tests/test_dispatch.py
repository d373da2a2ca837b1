"""'sorted' equals einsum / scatter; 'dropless' equals a per-token loop; both sharded equal one
device with their all-to-all and no token all-gather; 'auto' resolves per platform."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switch_jax.models import grouped
from switch_jax.models.config import ConfigError, MoeConfig
from switch_jax.models.layers import Keys
from switch_jax.models.moe import MoeLayer, resolve_dispatch
from switch_jax.parallel import partitioning
from tests.test_moe import (
    B,
    D,
    E,
    L,
    _loss_and_grads,
    apply,
    inputs,
    make_layer,
    moe_config,
    numpy_params,
    reference_layer,
)

IMPLS = ["blocked", "ragged_dot", "fused"]  # ragged_dot runs on XLA:CPU too, only slowly


def _flat_grads(grads) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (y1, s1, (gp1, gx1)), (y2, s2, (gp2, gx2)) = a, b
    y1, y2 = np.asarray(y1), np.asarray(y2)
    np.testing.assert_allclose(y1, y2, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(y1 == 0, y2 == 0)  # the same tokens dropped (and padding)
    for name, u, v in zip(s1._fields, s1, s2, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx2), rtol=rtol, atol=atol)
    f1, f2 = _flat_grads(gp1), _flat_grads(gp2)
    assert f1.keys() == f2.keys()
    for path in f1:
        assert np.abs(f1[path]).max() > 0, path
        np.testing.assert_allclose(f1[path], f2[path], rtol=rtol, atol=atol, err_msg=str(path))


CASES = [("relu", 1, False), ("geglu", 1, False), ("relu", 2, True)]


@pytest.mark.parametrize("activation, top_k, prioritized", CASES)
def test_sorted_equals_einsum_and_scatter(activation, top_k, prioritized):
    x, mask = inputs(1)
    cot = np.random.default_rng(2).standard_normal((B, L, D)).astype(np.float32)

    def run(dispatch, impl="auto"):
        cfg = moe_config(
            activation=activation,
            dispatch=dispatch,
            top_k=top_k,
            batch_prioritized_routing=prioritized,
            grouped_matmul=impl,
        )
        return _loss_and_grads(make_layer(cfg, seed=3), x, mask, cot)

    einsum = run("einsum")
    assert float(einsum[1].fraction_dropped) > 0.05, "train capacity must drop tokens here"
    _assert_same(run("scatter"), einsum)
    for impl in IMPLS:
        _assert_same(run("sorted", impl), einsum)


@pytest.mark.parametrize(
    "activation, top_k, impl, block",
    [
        ("relu", 1, "blocked", 3),  # blocks that split segments and leave padding
        ("geglu", 2, "blocked", 128),  # one block larger than all rows
        ("geglu", 2, "ragged_dot", 1),
        ("geglu", 2, "fused", 4),  # full blocks of 4, tails of 2 and 1
        ("relu", 1, "fused", 512),  # one tail block per segment
    ],
)
def test_dropless_equals_per_token_loop(activation, top_k, impl, block):
    # Train capacity (C = 2 of 8 tokens) would drop a third of these assignments: none drop.
    cfg = moe_config(
        activation=activation,
        dispatch="dropless",
        top_k=top_k,
        grouped_matmul=impl,
        dropless_block_size=block,
        fused_block_size=block,
    )
    layer = make_layer(cfg)
    x, mask = inputs()
    y, stats = apply(layer, x, mask, train=True)
    want = reference_layer(numpy_params(layer), x, mask, top_k)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    assert float(stats.fraction_dropped) == 0.0
    assert float(stats.effective_capacity_factor) > 1.0  # what capacity would have needed
    _, capped = apply(
        make_layer(cfg.replace(moe=_with(cfg.moe, dispatch="einsum"))), x, mask, train=True
    )
    assert float(capped.fraction_dropped) > 0.1
    # The losses do not depend on capacity: the same aux and z losses as with drops.
    for name in ("aux_loss", "router_z_loss", "expert_fraction"):
        np.testing.assert_allclose(
            np.asarray(getattr(stats, name)), np.asarray(getattr(capped, name)), rtol=1e-6
        )


def _with(moe: MoeConfig, **changes) -> MoeConfig:
    return dataclasses.replace(moe, **changes)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropless_gradients_equal_einsum_without_drops(impl):
    # Capacity factor E gives C = T: einsum drops nothing and is then the dropless function.
    x, mask = inputs(5)
    cot = np.random.default_rng(6).standard_normal((B, L, D)).astype(np.float32)
    common = dict(top_k=2, capacity_factor_train=float(E), activation="geglu")
    want = _loss_and_grads(make_layer(moe_config(dispatch="einsum", **common), 7), x, mask, cot)
    cfg = moe_config(
        dispatch="dropless",
        grouped_matmul=impl,
        dropless_block_size=4,
        fused_block_size=4,
        **common,
    )
    got = _loss_and_grads(make_layer(cfg, 7), x, mask, cot)
    assert float(want[1].fraction_dropped) == 0.0
    y1, s1, g1 = got
    y2, s2, g2 = want
    # effective_capacity_factor differs by definition (C = T there); the rest must not.
    s1 = s1._replace(effective_capacity_factor=s2.effective_capacity_factor)
    _assert_same((y1, s1, g1), (y2, s2, g2))


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_capacity_dispatches_draw_the_same_expert_dropout(activation):
    # 'sorted' reads the slot mask einsum and scatter draw: with expert dropout on, every
    # capacity dispatch and grouped matmul (fused: its own loops and backward) is one function.
    x, mask = inputs(8)
    cot = np.random.default_rng(9).standard_normal((B, L, D)).astype(np.float32)
    keys = Keys(dropout=jax.random.key(4))

    def run(dispatch, impl="auto"):
        cfg = moe_config(
            activation=activation,
            dispatch=dispatch,
            grouped_matmul=impl,
            expert_dropout_rate=0.3,
            fused_block_size=2,
        )
        return _loss_and_grads(make_layer(cfg, seed=5), x, mask, cot, keys=keys)

    scatter = run("scatter")
    assert float(scatter[1].fraction_dropped) > 0.05
    for impl in IMPLS:
        _assert_same(run("sorted", impl), scatter)
    clean = _loss_and_grads(make_layer(moe_config(activation=activation), 5), x, mask, cot)
    assert not np.allclose(np.asarray(scatter[0]), np.asarray(clean[0])), "no dropout happened"


def test_take_rows_backward_is_the_inverse_gather():
    x = jnp.arange(12.0).reshape(4, 3)
    src = jnp.array([2, 4, 0, 4, 3], jnp.int32)  # 4 = a zero row; row 1 is not taken
    dst = grouped.inverse_map(src, 4)
    np.testing.assert_array_equal(np.asarray(dst), [2, 5, 0, 4])
    cot = jnp.arange(15.0).reshape(5, 3) + 1
    got = jax.grad(lambda x: jnp.sum(grouped.take_rows(x, src, dst) * cot))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.take(jnp.pad(x, ((0, 1), (0, 0))), src, 0) * cot))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- auto


def test_auto_resolves_to_a_capacity_dispatch_per_platform():
    assert resolve_dispatch("auto", "tpu") == "einsum"
    for platform in ("cpu", "gpu"):
        assert resolve_dispatch("auto", platform) in ("einsum", "scatter", "sorted")
    assert resolve_dispatch("dropless", "tpu") == "dropless"
    assert MoeConfig().dispatch == "auto"
    with pytest.raises(ConfigError, match="dispatch"):
        MoeConfig(dispatch="ragged")
    p = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
    cfg = p.adapt_model_config(moe_config(dispatch="auto"))
    assert cfg.moe.dispatch == resolve_dispatch("auto", "cpu") != "auto"


# ----------------------------------------------------------------------------- sharded

BS, LS, DS, ES = 8, 8, 24, 12  # a d_model and expert count no other dimension shares (HLO)


def _layer(p, dispatch, impl, **moe_changes):
    moe = MoeConfig(
        num_experts=ES,
        group_size=8,
        min_capacity=1,
        top_k=2,
        dispatch=dispatch,
        grouped_matmul=impl,
        dropless_block_size=4,
        **moe_changes,
    )
    cfg = p.adapt_model_config(moe_config().replace(d_model=DS, d_ff=32, moe=moe), BS)
    return nnx.split(nnx.eval_shape(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _loss(graphdef, keys=None):
    keys = Keys() if keys is None else keys

    def loss(params, x, mask):
        y, stats = nnx.merge(graphdef, params)(x, mask, keys, train=True)
        return jnp.sum(y * y) + stats.aux_loss, stats.fraction_dropped

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def layer_inputs():
    rs = np.random.RandomState(1)
    _, abstract = _layer(
        partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1]), "dropless", "blocked"
    )
    params = jax.tree.map(lambda v: 0.3 * rs.randn(*v.shape).astype(np.float32), abstract)
    x, mask = rs.randn(BS, LS, DS).astype(np.float32), rs.rand(BS, LS) > 0.2
    return abstract, params, x, mask


_RUNS: dict = {}


def _run(mesh_shape, dispatch, impl, layer_inputs):
    key = (mesh_shape, dispatch, impl)
    if key not in _RUNS:
        _RUNS[key] = _run_uncached(mesh_shape, dispatch, impl, layer_inputs)
    return _RUNS[key]


def _run_uncached(mesh_shape, dispatch, impl, layer_inputs):
    abstract, params, x, mask = layer_inputs
    if mesh_shape == (1, 1, 1):
        p = partitioning.Partitioner(mesh_shape, devices=jax.devices()[:1])
    else:
        p = partitioning.Partitioner(mesh_shape)
    graphdef, _ = _layer(p, dispatch, impl)
    params = jax.device_put(params, p.param_shardings(abstract))
    batch = p.shard_batch({"x": x, "mask": mask})
    with p.activate():
        fn = _loss(graphdef)
        out = jax.device_get(fn(params, batch["x"], batch["mask"]))
        hlo = fn.lower(params, batch["x"], batch["mask"]).compile().as_text()
    return out, hlo


SHARDED = [
    ("dropless", "blocked", (2, 2, 2)),  # fixed-size all-to-all, d_ff over 'model' (psum)
    ("dropless", "ragged_dot", (4, 1, 2)),  # per batch shard, no all-to-all needed
    ("sorted", "ragged_dot", (2, 2, 2)),  # expert parallel: capacity segments + all-to-all
    ("sorted", "ragged_dot", (4, 1, 2)),  # ragged_dot per batch shard in shard_map
    ("sorted", "fused", (4, 1, 2)),  # the fused FFN per batch shard, d_ff split (psum)
    ("dropless", "fused", (2, 2, 2)),  # the fused FFN behind the expert all-to-all
]


@pytest.mark.parametrize("dispatch, impl, mesh_shape", SHARDED)
def test_sharded_equals_single_device_with_all_to_all(dispatch, impl, mesh_shape, layer_inputs):
    # One device, blocked grouped matmul: the reference for either implementation.
    (ref_loss, ref_dropped), ref_grads = _run((1, 1, 1), dispatch, "blocked", layer_inputs)[0]
    ((loss, dropped), grads), hlo = _run(mesh_shape, dispatch, impl, layer_inputs)
    assert (float(ref_dropped) == 0.0) == (dispatch == "dropless")
    np.testing.assert_allclose(float(dropped), float(ref_dropped))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for name in ("wi", "wo", "router"):
        ref, got = np.asarray(ref_grads[name]), np.asarray(grads[name])
        scale = np.abs(ref).max()
        assert scale > 0, name
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    a2a = len(re.findall(r"all-to-all(-start)?\(", hlo))
    if mesh_shape[1] > 1:  # expert parallel: tokens travel there and back (and in the bwd)
        assert a2a >= 2, "no all-to-all under expert parallelism"
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather(?:-start)?\(", hlo)
    token_gathers = [s for s in gathered if str(DS) in s.split(",")]
    assert not token_gathers, f"token activations all-gathered: {token_gathers}"
    prob_gathers = [s for s in gathered if s.split(",")[-1] == str(ES)]
    assert not prob_gathers, f"router probabilities all-gathered: {prob_gathers}"


def test_sharded_sorted_fused_draws_the_single_device_dropout(layer_inputs):
    # Rows per batch shard (d_ff over 'model') read their slots of the one global mask.
    abstract, params, x, mask = layer_inputs
    keys = Keys(dropout=jax.random.key(11))
    out = {}
    for mesh_shape, dispatch, impl in [
        ((1, 1, 1), "scatter", "auto"),
        ((4, 1, 2), "sorted", "fused"),
    ]:
        devices = jax.devices()[: math.prod(mesh_shape)]
        p = partitioning.Partitioner(mesh_shape, devices=devices)
        graphdef, _ = _layer(p, dispatch, impl, expert_dropout_rate=0.5)
        sharded = jax.device_put(params, p.param_shardings(abstract))
        batch = p.shard_batch({"x": x, "mask": mask})
        with p.activate():
            out[dispatch] = jax.device_get(
                _loss(graphdef, keys)(sharded, batch["x"], batch["mask"])
            )
    ((ref, _), ref_grads), ((got, _), grads) = out["scatter"], out["sorted"]
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    for name in ("wi", "wo", "router"):
        scale = np.abs(np.asarray(ref_grads[name])).max()
        np.testing.assert_allclose(
            np.asarray(grads[name]), np.asarray(ref_grads[name]), rtol=1e-5, atol=1e-5 * scale
        )
