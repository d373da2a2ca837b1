"""Mesh construction, rule table, config checks, shardings and host batches on 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from switch_jax.models import layers
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
from switch_jax.models.size import abstract_model
from switch_jax.parallel import partitioning


def small_config(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        d_ff=32,
        num_heads=2,
        head_dim=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        moe=MoeConfig(num_experts=4, group_size=8, **moe),
    )


@pytest.mark.parametrize(
    "shape,resolved",
    [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 4, -1), (1, 4, 2)), ((4, 2, 1), None)],
)
def test_mesh_resolves_the_rest(shape, resolved):
    mesh = partitioning.make_mesh(shape)
    assert mesh.axis_names == ("data", "expert", "model")
    assert tuple(mesh.shape.values()) == (resolved or shape)
    assert mesh.axis_types == (AxisType.Auto,) * 3  # Explicit would ignore our constraints


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, 3, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(shape):
    with pytest.raises(ConfigError, match="MESH_SHAPE"):
        partitioning.make_mesh(shape)


def test_multi_slice_mesh_on_one_host():
    # One process = one granule, so the DCN shape can only be (1, 1, 1) here; the 2-process
    # test exercises a real DCN split.
    mesh = partitioning.make_mesh((2, 2, 2), dcn_mesh_shape=(1, 1, 1))
    assert tuple(mesh.shape.values()) == (2, 2, 2)
    with pytest.raises(ConfigError, match="DCN_MESH_SHAPE"):
        partitioning.make_mesh((2, 2, 2), dcn_mesh_shape=(2, 1, 1))


def test_adapt_sets_group_partitions_and_checks_divisibility():
    p = partitioning.Partitioner((2, 2, 2))
    cfg = p.adapt_model_config(small_config(), batch_size=8)
    assert cfg.moe.num_expert_partitions == 4  # groups split over data x expert
    with pytest.raises(ConfigError, match="num_experts=3 must be divisible by the expert axis"):
        p.adapt_model_config(small_config().replace(moe=MoeConfig(num_experts=3)))
    with pytest.raises(ConfigError, match="BATCH_SIZE=6 must be divisible by data x expert"):
        p.adapt_model_config(small_config(), batch_size=6)
    with pytest.raises(ConfigError, match="num_heads=3"):
        p.adapt_model_config(small_config().replace(num_heads=3))
    dense = small_config().replace(moe=None)
    assert p.adapt_model_config(dense, 8) == dense


def test_unknown_rule_set_and_unknown_logical_axis():
    with pytest.raises(ConfigError, match="partition_rules"):
        partitioning.Partitioner((8, 1, 1), rules="zero3")
    with pytest.raises(ValueError, match="no rule"):
        partitioning.Partitioner((8, 1, 1)).mesh_spec(("batch", "sequence"))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_rule_table_covers_every_parameter_axis(scan_layers):
    params = nnx.state(abstract_model(small_config().replace(scan_layers=scan_layers)), nnx.Param)
    shardings = partitioning.Partitioner((2, 2, 2)).param_shardings(params)  # raises if unmapped
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    experts = 0
    variables = jax.tree.leaves(params, is_leaf=is_var)
    for var, sharding in zip(variables, jax.tree.leaves(shardings, is_leaf=is_var), strict=True):
        axes = var.get_metadata()["out_sharding"]
        spec = tuple(sharding.get_value().spec) + (None,) * len(axes)
        for axis, mesh_axis in zip(axes, spec[: len(axes)], strict=True):
            want = {"expert": "expert", "mlp": "model", "heads": "model", "vocab": "model"}
            assert mesh_axis == want.get(axis), (axes, spec)
        experts += "expert" in axes
    assert experts == 4  # wi, wo of one sparse layer per stack


def test_parameter_and_batch_specs():
    p = partitioning.Partitioner((2, 2, 2))
    assert p.mesh_spec(("expert", "embed", "mlp"), param=True) == jax.P("expert", None, "model")
    assert p.mesh_spec(("vocab", "embed"), param=True) == jax.P("model", None)
    assert p.mesh_spec(("batch", "length", "embed")) == jax.P(("data", "expert"), None, None)
    assert p.mesh_spec(("expert", "expert_group", "expert_capacity", "embed")) == jax.P(
        "expert", "data", None, None
    )
    fsdp = partitioning.Partitioner((2, 2, 2), rules="fsdp")
    assert fsdp.mesh_spec(("embed", "mlp"), param=True) == jax.P("data", "model")
    assert fsdp.mesh_spec(("embed",), param=True) == jax.P(None)
    # Activations keep the default table: 'data' is already taken by the batch.
    assert fsdp.mesh_spec(("batch", "length", "embed")) == jax.P(("data", "expert"), None, None)


def test_constraints_act_only_inside_activate():
    p = partitioning.Partitioner((2, 2, 2))
    x = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)

    def f(x):
        return layers.constrain(x * 2, ("batch", "length", "embed"))

    assert jax.jit(f)(x).sharding.is_fully_replicated
    with p.activate():
        y = jax.jit(f)(x)
    assert y.sharding.spec == jax.P(("data", "expert"))
    assert y.addressable_shards[0].data.shape == (2, 4, 6)


def test_shard_batch_makes_global_arrays_from_host_rows():
    p = partitioning.Partitioner((2, 2, 2))
    host = {"decoder_input_tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    assert p.host_batch_slice(8) == slice(0, 8)  # one process feeds every row
    with p.activate():
        batch = p.shard_batch(host)
    tokens = batch["decoder_input_tokens"]
    assert tokens.shape == (8, 3) and tokens.sharding == p.batch_sharding
    assert tokens.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(tokens), host["decoder_input_tokens"])


def test_jnp_array_under_set_mesh_is_replicated_trap():
    """The trap DESIGN.md records: jnp.array of host data is replicated, so never use it for
    per-host batches; shard_batch above is what gives a sharded array."""
    p = partitioning.Partitioner((2, 2, 2))
    with p.activate():
        assert jnp.array(np.ones((8, 3))).sharding.is_fully_replicated
