"""The planner (`switch_jax.info`) sizes the state training builds, and refuses what it refuses.

Its per-device bytes come from an AbstractMesh (no devices); here they must equal the bytes of
the live state's addressable shards on each of the 8 CPU devices.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import pytest
from model_fixtures import tiny_config

from switch_jax.config.settings import (
    CheckpointConfig,
    Configs,
    DataConfig,
    OptimizerConfig,
    TrainConfig,
)
from switch_jax.models.config import ConfigError
from switch_jax.parallel import partitioning
from switch_jax.tools import planner
from switch_jax.training import build

# Dims divisible by 2 on every axis; Adafactor factors dims >= 8 here, as >= 128 in real models,
# so expert kernels keep per-expert [E, D] / [E, F] statistics and attention [D, H*K] ones.
CFG = tiny_config(d_model=32, d_ff=64, num_heads=4, head_dim=8)
OPT = OptimizerConfig(min_dim_size_to_factor=8)
BATCH = 8
MESHES = [((2, 2, 2), "default"), ((2, 2, 2), "fsdp")]


def configs(mesh_shape, rules) -> Configs:
    train = TrainConfig(mesh_shape=mesh_shape, partition_rules=rules)
    return Configs(CFG, train, DataConfig(batch_size=BATCH), CheckpointConfig(), OPT)


@functools.lru_cache  # plans are immutable; tests share them
def planned(mesh_shape, rules="default") -> planner.Plan:
    # The live state below is on CPU devices: plan for that platform ('auto' dispatch).
    abstract = partitioning.Partitioner(
        mesh_shape, rules=rules, num_devices=math.prod(mesh_shape), planned_platform="cpu"
    )
    return planner.plan(configs(mesh_shape, rules), abstract)


def live_bytes_per_device(tree) -> dict:
    """Bytes each device holds of `tree`'s arrays, from their addressable shards."""
    per_device = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return per_device


@pytest.mark.parametrize("mesh_shape, rules", MESHES)
def test_planned_bytes_equal_the_live_state_on_every_device(mesh_shape, rules):
    plan = planned(mesh_shape, rules)
    assert plan.run.partitioner.is_abstract
    live = build.build_run(configs(mesh_shape, rules))  # the trainer's way, 8 CPU devices
    assert live.model_cfg == plan.run.model_cfg  # the same MoE group partitioning
    state = live.setup.init_state()
    mem = plan.memory
    for part, want in (
        (state.params, mem.param_bytes_per_device),
        (state.opt_state, mem.optimizer_bytes_per_device),
        ((state.step, state.rng), mem.other_bytes_per_device),
    ):
        per_device = live_bytes_per_device(part)
        assert len(per_device) == 8 and set(per_device.values()) == {want}
    assert sum(x.nbytes for x in jax.tree.leaves(state.params)) == mem.param_bytes_total
    assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) == mem.optimizer_bytes_total


def test_sharding_actually_splits_the_state():
    # Guards the test above against a planner and a state that both replicate everything.
    one, fsdp = planned((1, 1, 1)).memory, planned((2, 2, 2), "fsdp").memory
    assert one.param_bytes_per_device == one.param_bytes_total
    assert fsdp.param_bytes_per_device < one.param_bytes_total / 4
    assert fsdp.optimizer_bytes_per_device < one.optimizer_bytes_per_device


@pytest.mark.parametrize(
    "gin_file, bindings, mesh_shape",
    [("models/switch_c.gin", [], (1, 1, 8)), ("models/tiny.gin", ["NUM_EXPERTS=4"], (1, 8, 1))],
)
def test_info_refuses_a_mesh_with_the_trainers_message(gin_file, bindings, mesh_shape):
    # Switch-C's 30 heads on a model axis of 8; 4 experts on an expert axis of 8.
    from switch_jax.config import gin_config

    bindings = [*bindings, f"MESH_SHAPE={mesh_shape}"]
    with pytest.raises(ConfigError) as planned:
        planner.run_info([gin_file], bindings)
    gin_config.parse_gin([gin_file], bindings)
    with pytest.raises(ConfigError) as trained:  # the trainer's build_run, on the 8 devices
        build.build_run(gin_config.load_configs())
    assert str(planned.value) == str(trained.value)


def test_info_refuses_a_batch_the_first_train_step_would_refuse():
    from switch_jax.config import gin_config
    from switch_jax.training import steps

    bindings = ["MESH_SHAPE=(1, 8, 1)", "BATCH_SIZE=8", "MICROBATCHES=2"]  # 8 rows, 16 shards
    with pytest.raises(ConfigError) as planned:
        planner.run_info(["models/tiny.gin"], bindings)
    gin_config.parse_gin(["models/tiny.gin"], bindings)
    live = build.build_run(gin_config.load_configs())
    batch = steps.batch_shapes(live.model_cfg, 8, live.lengths, live.partitioner.batch_sharding)
    with pytest.raises(ConfigError) as trained, live.partitioner.activate():
        live.setup.train_step.jitted.trace(live.setup.abstract_state, batch)
    assert str(planned.value) == str(trained.value)
    assert "OptimizerConfig.microbatches (2)" in str(planned.value)


@pytest.mark.parametrize("mesh_shape, dcn", [((-1, 2, 2), None), ((2, -1, 1), (1, 1, 1))])
def test_abstract_mesh_has_the_shape_of_the_real_one(mesh_shape, dcn):
    real = partitioning.Partitioner(mesh_shape, dcn)
    abstract = partitioning.Partitioner(mesh_shape, dcn, num_devices=8)
    assert abstract.is_abstract and not real.is_abstract
    assert dict(abstract.mesh.shape) == dict(real.mesh.shape)
    with pytest.raises(ValueError, match="needs devices"):
        abstract.host_batch_slice(8)


def test_abstract_multi_slice_mesh_multiplies_per_slice_by_dcn():
    # One host has one DCN granule, so this one is checked by hand: 2 slices of (1, 4, 2).
    p = partitioning.Partitioner((1, -1, 2), (2, 1, 1), num_devices=16)
    assert dict(p.mesh.shape) == {"data": 2, "expert": 4, "model": 2}


def test_fits_line_names_the_chips_by_hbm():
    gib = 2**30
    line = planner.fits_line(20 * gib)
    assert line.startswith("HBM per chip   state + gradients 20.00 GiB: fits v5p (95.74 GiB),")
    assert "v6e (31.25 GiB), v4 (30.75 GiB); not v5e (15.75 GiB)" in line
    assert "fits no TPU chip; not v5p (95.74 GiB)" in planner.fits_line(96 * gib)
    assert "; not" not in planner.fits_line(gib)  # every chip


def test_report_says_which_chips_the_state_and_gradients_fit():
    r = planner.report(configs((2, 2, 2), "default"), num_devices=8)
    need = r["state_bytes_per_device"] + r["param_bytes_per_device"]
    assert r["state_and_gradient_bytes_per_device"] == need
    assert r["fits_chips"] == {"v5p": True, "v6e": True, "v4": True, "v5e": True}
    assert planner.format_report(r).endswith(planner.fits_line(need))
