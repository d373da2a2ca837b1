"""Sharded train steps on 8 CPU devices equal the single-device step; experts really sharded."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switch_jax.config.settings import OptimizerConfig
from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.models.layers import Keys
from switch_jax.models.moe import MoeLayer
from switch_jax.parallel import partitioning
from switch_jax.training import steps

B, L, VOCAB = 8, 8, 64
# 64 tokens per stack in groups of 8 -> 8 groups on every mesh below, so routing (and hence
# the loss) is identical to the single-device reference. Capacity 2 of 8 tokens: drops happen.
MOE = MoeConfig(num_experts=4, group_size=8, min_capacity=1, jitter_eps=0.01)
OPT = OptimizerConfig(min_dim_size_to_factor=8)  # tiny dims still get factored statistics


def tiny_config(architecture: str = "encoder_decoder") -> ModelConfig:
    return ModelConfig(
        architecture=architecture,
        vocab_size=VOCAB,
        d_model=16,
        d_ff=32,
        num_heads=2,
        head_dim=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        # Router jitter exercises the per-step noise keys; dropout uses the same key path but its
        # many threefry draws add ~5 s of XLA:CPU compile per step, so it stays off here.
        dtype="float32",  # tight comparisons; bf16 is the default elsewhere
        moe=MOE,
    )


def tiny_batch(architecture: str = "encoder_decoder", seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    names = ["decoder_input_tokens", "decoder_target_tokens"]
    if architecture == "encoder_decoder":
        names.append("encoder_input_tokens")
    batch = {k: rs.randint(1, VOCAB, (B, L)).astype(np.int32) for k in names}
    batch["decoder_target_tokens"][:, -2:] = 0  # padding: excluded from the loss
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.float32)
    return batch


def single_device() -> partitioning.Partitioner:
    return partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])


def run_steps(partitioner, architecture, host_state, batch, num_steps=2):
    """Train `num_steps` from a host copy of the state; returns (metrics list, final state)."""
    cfg = partitioner.adapt_model_config(tiny_config(architecture), B)
    abstract = steps.abstract_train_state(cfg, OPT, partitioner)
    train_step = steps.make_train_step(cfg, OPT, partitioner, abstract=abstract)
    state = jax.device_put(host_state, abstract.shardings)
    global_batch = partitioner.shard_batch(batch)
    history = []
    for _ in range(num_steps):
        state, metrics = train_step(state, global_batch)
        history.append(jax.device_get(metrics))
    return history, state


@pytest.fixture(scope="module")
def reference():
    """Per architecture: the state created sharded on (2, 2, 2) (kept on device, never donated),
    its host copy, the batch, and the single-device metrics and final parameters."""
    cache = {}

    def get(architecture):
        if architecture not in cache:
            p = partitioning.Partitioner((2, 2, 2))
            cfg = p.adapt_model_config(tiny_config(architecture), B)
            sharded = steps.init_train_state(cfg, OPT, p, seed=0)
            host_state = jax.device_get(sharded)
            batch = tiny_batch(architecture)
            history, state = run_steps(single_device(), architecture, host_state, batch)
            final_params = jax.device_get(state.params)
            cache[architecture] = (sharded, host_state, batch, history, final_params)
        return cache[architecture]

    return get


def _flat(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(params)}


MESHES = [(2, 2, 2), (1, 4, 2), (4, 2, 1), (8, 1, 1)]
CASES = [("encoder_decoder", m) for m in MESHES] + [
    ("decoder_only", (2, 2, 2)),
    *[pytest.param("decoder_only", m, marks=pytest.mark.slow) for m in MESHES[1:]],
]


@pytest.mark.parametrize("architecture,mesh_shape", CASES)
def test_sharded_step_equals_single_device(reference, architecture, mesh_shape):
    _, host_state, batch, ref_history, ref_params = reference(architecture)
    p = partitioning.Partitioner(mesh_shape)
    history, state = run_steps(p, architecture, host_state, batch)
    for name in ("loss", "cross_entropy", "aux_loss", "grad_norm"):
        got, want = [h[name] for h in history], [h[name] for h in ref_history]
        np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=name)
    got, want = _flat(jax.device_get(state.params)), _flat(ref_params)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-6, err_msg=name)


def _expert_kernel(tree):
    return tree["decoder"]["blocks"][1]["layers"][0]["mlp"]["wi"]


def test_state_is_created_sharded(reference):
    """init under jit lands directly in the target shardings: experts over 'expert', d_ff over
    'model', and the expert kernel's Adafactor statistics [E, D] / [E, F] likewise."""
    state = reference("encoder_decoder")[0]
    wi = _expert_kernel(state.params).get_value()  # [E=4, D=16, F=32]
    assert wi.sharding.spec == jax.P("expert", None, "model")
    assert wi.addressable_shards[0].data.shape == (2, 16, 16)
    stats = _expert_kernel(state.opt_state[0].stats)
    assert stats.v_row.shape == (4, 16) and stats.v_col.shape == (4, 32)
    assert stats.v_row.addressable_shards[0].data.shape == (2, 16)
    assert stats.v_col.addressable_shards[0].data.shape == (2, 16)
    embedding = state.params["token_embedder"]["embedding"].get_value()  # vocab over 'model'
    assert embedding.addressable_shards[0].data.shape == (VOCAB // 2, 16)


def test_fsdp_shards_embed_over_data():
    p = partitioning.Partitioner((2, 2, 2), rules="fsdp")
    cfg = p.adapt_model_config(tiny_config(), B)
    abstract = steps.abstract_train_state(cfg, OPT, p)
    wi = _expert_kernel(abstract.shardings.params).get_value()
    assert wi.spec == jax.P("expert", "data", "model")
    scale = abstract.shardings.params["encoder"]["final_norm"]["scale"].get_value()
    assert scale.spec == jax.P(None)  # vectors stay replicated


def _moe_layer(p, d_model, dispatch="scatter", num_experts=4):
    moe = MoeConfig(num_experts=num_experts, group_size=8, min_capacity=1, dispatch=dispatch)
    cfg = p.adapt_model_config(tiny_config().replace(d_model=d_model, moe=moe), B)
    return nnx.split(nnx.eval_shape(lambda: MoeLayer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _moe_loss(graphdef):
    def loss(params, x, mask):
        y, stats = nnx.merge(graphdef, params)(x, mask, Keys(), train=True)
        return jnp.sum(y * y) + stats.aux_loss

    return loss


def test_expert_gradients_equal_single_device():
    """No hidden rescaling of expert gradients (Adafactor's update would mask a constant factor,
    so the train-step comparison alone cannot see one; grad_norm there checks the global scale)."""
    graphdef, abstract_params = _moe_layer(single_device(), 16)
    rs = np.random.RandomState(1)
    params = jax.tree.map(lambda v: 0.3 * rs.randn(*v.shape).astype(np.float32), abstract_params)
    x, mask = rs.randn(B, L, 16).astype(np.float32), rs.rand(B, L) > 0.2
    grads = {}
    for mesh_shape in [(1, 1, 1), (2, 2, 2)]:
        p = single_device() if mesh_shape == (1, 1, 1) else partitioning.Partitioner(mesh_shape)
        graphdef, _ = _moe_layer(p, 16)
        sharded = jax.device_put(params, p.param_shardings(abstract_params))
        batch = p.shard_batch({"x": x, "mask": mask})
        with p.activate():
            g = jax.jit(jax.grad(_moe_loss(graphdef)))(sharded, batch["x"], batch["mask"])
        grads[mesh_shape] = jax.device_get(g)
    for name in ("wi", "wo", "router"):
        ref, got = np.asarray(grads[(1, 1, 1)][name]), np.asarray(grads[(2, 2, 2)][name])
        scale = np.abs(ref).max()
        assert scale > 0, name
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        assert np.sum(got * ref) / np.sum(ref * ref) == pytest.approx(1.0, abs=1e-6), name


D_HLO = 24  # a d_model no other dimension of the MoE layer shares, to spot token gathers
E_HLO = 12  # likewise for the expert count, to spot gathers of router probabilities


@pytest.mark.parametrize("dispatch", ["einsum", "scatter"])
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_moe_layer_hlo_uses_all_to_all(dispatch, mesh_shape):
    p = partitioning.Partitioner(mesh_shape)
    graphdef, abstract_params = _moe_layer(p, D_HLO, dispatch, E_HLO)
    params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        abstract_params,
        p.param_shardings(abstract_params),
    )
    x = jax.ShapeDtypeStruct((B, L, D_HLO), jnp.float32, sharding=p.sharding(("batch",)))
    mask = jax.ShapeDtypeStruct((B, L), jnp.bool_, sharding=p.sharding(("batch",)))
    with p.activate():
        hlo = jax.jit(jax.grad(_moe_loss(graphdef))).lower(params, x, mask).compile().as_text()
    assert len(re.findall(r"all-to-all(-start)?\(", hlo)) >= 2  # there and back (and in bwd)
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather(?:-start)?\(", hlo)
    token_gathers = [s for s in gathered if str(D_HLO) in s.split(",")]
    assert not token_gathers, f"token activations all-gathered: {token_gathers}"
    # lax.top_k would gather [G, T, E] probabilities over the batch shards; routing avoids it.
    prob_gathers = [s for s in gathered if s.split(",")[-1] == str(E_HLO)]
    assert not prob_gathers, f"router probabilities all-gathered: {prob_gathers}"
