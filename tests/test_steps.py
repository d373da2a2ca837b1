"""Loss, metrics, accumulation and config checks of the train / eval steps (single device)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_sharded_training import OPT, B, single_device, tiny_batch, tiny_config

from switch_jax.models.config import ConfigError
from switch_jax.parallel import partitioning
from switch_jax.training import steps

ARCH = "decoder_only"


@pytest.fixture(scope="module")
def setup():
    p = single_device()
    cfg = p.adapt_model_config(tiny_config(ARCH), B)
    s = steps.setup_training(cfg, OPT, p, seed=0)
    return p, cfg, s, jax.device_get(s.init_state())


def _logits(cfg, graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    return jax.jit(lambda b: model(b, train=False)[0])(batch)


def test_eval_loss_matches_numpy(setup):
    p, cfg, s, host_state = setup
    batch = tiny_batch(ARCH)
    batch["decoder_loss_weights"][0, :3] = 0.0  # weights, not just padding, decide what counts
    params = jax.device_put(host_state.params, s.state_shardings.params)
    metrics = jax.device_get(s.eval_step(params, p.shard_batch(batch)))

    graphdef = steps.abstract_train_state(cfg, OPT, p).graphdef
    logits = np.asarray(_logits(cfg, graphdef, params, batch), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"]
    ce = ((lse - target) * w).sum() / w.sum()
    z = 1e-4 * (lse**2 * w).sum() / w.sum()
    acc = ((logits.argmax(-1) == batch["decoder_target_tokens"]) * w).sum() / w.sum()
    assert metrics["num_tokens"] == w.sum()
    assert metrics["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert metrics["z_loss"] == pytest.approx(z, rel=1e-4)
    assert metrics["accuracy"] == pytest.approx(acc)
    aux = cfg.moe.aux_loss_coef * np.mean(metrics["decoder/aux_loss"])
    assert metrics["aux_loss"] == pytest.approx(aux, rel=1e-6)
    parts = ("cross_entropy", "z_loss", "aux_loss", "router_z_loss")
    assert metrics["loss"] == pytest.approx(sum(metrics[k] for k in parts), rel=1e-6)


def test_train_metrics_and_eval_capacity(setup):
    p, cfg, s, host_state = setup
    state = jax.device_put(host_state, s.state_shardings)
    batch = p.shard_batch(tiny_batch(ARCH))
    state, metrics = s.train_step(state, batch)
    state, metrics2 = s.train_step(state, batch)
    metrics = jax.device_get(metrics)
    assert int(state.step) == 2
    assert metrics["learning_rate"] == pytest.approx(0.01)  # 1 / sqrt(max(0, 10_000))
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
    assert float(metrics2["loss"]) < metrics["loss"]  # same batch twice: it learns
    sparse_layers, E = 1, cfg.moe.num_experts
    assert metrics["decoder/expert_fraction"].shape == (sparse_layers, E)
    assert metrics["decoder/expert_fraction"].sum() == pytest.approx(1.0)
    for name in ("fraction_dropped", "router_confidence", "aux_loss", "router_z_loss"):
        assert metrics[f"decoder/{name}"].shape == (sparse_layers,)
    assert "encoder/aux_loss" not in metrics
    # T=8, E=4, min capacity 1: train cf 1.25 -> C=2 (CF 1.0); eval cf 2.0 -> C=4 (CF 2.0).
    assert metrics["decoder/effective_capacity_factor"] == pytest.approx(1.0)
    eval_metrics = s.eval_step(state.params, batch)
    assert float(eval_metrics["decoder/effective_capacity_factor"]) == pytest.approx(2.0)
    assert (
        float(eval_metrics["decoder/fraction_dropped"][0]) <= metrics["decoder/fraction_dropped"][0]
    )


def test_microbatches_equal_the_full_batch_step(setup):
    """k=2 microbatches (rows i::2) give the full-batch update. Groups are single sequences
    (group_size = L) so grouping is the same; jitter is off since each microbatch draws its own."""
    p, _, _, host_state = setup
    moe = dataclasses.replace(tiny_config(ARCH).moe, jitter_eps=0.0)
    cfg = p.adapt_model_config(tiny_config(ARCH).replace(moe=moe), B)
    batch = tiny_batch(ARCH)
    batch["decoder_loss_weights"][1::2, :4] = 0.0  # unequal real tokens per microbatch
    results = []
    for k in (1, 2):
        opt = dataclasses.replace(OPT, microbatches=k)
        abstract = steps.abstract_train_state(cfg, opt, p)
        train_step = steps.make_train_step(cfg, opt, p, abstract=abstract)
        state, metrics = train_step(
            jax.device_put(host_state, abstract.shardings), p.shard_batch(batch)
        )
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m2, p2) = results
    for name in ("loss", "cross_entropy", "z_loss", "aux_loss", "num_tokens", "grad_norm"):
        assert m2[name] == pytest.approx(m1[name], rel=1e-5), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p2, p1)


def test_ungrouped_config_and_bad_batch_are_clear_errors(setup):
    _, _, _, host_state = setup
    p = partitioning.Partitioner((2, 2, 2))
    batch = tiny_batch(ARCH)
    # Not adapted to the mesh: 64 tokens in groups of 32 = 2 groups over 4 batch shards.
    moe = dataclasses.replace(tiny_config(ARCH).moe, group_size=32)
    cfg = tiny_config(ARCH).replace(moe=moe)
    train_step = steps.make_train_step(cfg, OPT, p)
    state = jax.device_put(host_state, steps.abstract_train_state(cfg, OPT, p).shardings)
    with pytest.raises(ConfigError, match="adapt_model_config"):
        train_step(state, p.shard_batch(batch))
    opt = dataclasses.replace(OPT, microbatches=4)  # 8 rows / (4 shards x 4 microbatches)
    train_step = steps.make_train_step(p.adapt_model_config(cfg, B), opt, p)
    with pytest.raises(ConfigError, match="microbatches"):
        train_step(state, p.shard_batch(batch))


def test_abstract_state_carries_target_shardings():
    p = partitioning.Partitioner((2, 2, 2))
    cfg = p.adapt_model_config(tiny_config(), B)
    abstract = steps.abstract_train_state(cfg, OPT, p)
    leaves = jax.tree.leaves(abstract.state)
    assert leaves and all(leaf.sharding is not None for leaf in leaves)
    assert abstract.state.step.shape == () and abstract.state.rng.shape == (2,)
    assert jax.tree.structure(abstract.state) == jax.tree.structure(abstract.shardings)


@pytest.mark.slow
def test_dense_model_trains(setup):
    p = single_device()
    cfg = tiny_config(ARCH).replace(moe=None)
    s = steps.setup_training(cfg, OPT, p)
    state, metrics = s.train_step(s.init_state(), p.shard_batch(tiny_batch(ARCH)))
    assert float(metrics["aux_loss"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert not any("/" in name for name in metrics)
