"""T5.1.1 stacks with Switch layers: masks, position buckets, scan, precision, training."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from switch_jax.models import layers, routing
from switch_jax.models.layers import Keys, relative_position_bucket
from switch_jax.models.routing import RouterStats
from tests.model_fixtures import (
    flat_params,
    forward,
    make_model,
    random_batch,
    tiny_config,
    unflatten,
)

KEY = jax.random.key(0)

# ----------------------------------------------------------------------------- position buckets


def reference_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
    """T5 / flaxformer `_relative_position_bucket`, NumPy float32 with its epsilon, one by one."""
    out = []
    for rp in np.asarray(relative_position).ravel():
        n, bucket, buckets = -int(rp), 0, num_buckets
        if bidirectional:
            buckets //= 2
            bucket = buckets if n < 0 else 0
            n = abs(n)
        else:
            n = max(n, 0)
        max_exact = buckets // 2
        if n < max_exact:
            bucket += n
        else:
            ratio = np.log(np.float32(n) / max_exact + np.finfo(np.float32).eps)
            large = max_exact + int(
                ratio / math.log(max_distance / max_exact) * (buckets - max_exact)
            )
            bucket += min(large, buckets - 1)
        out.append(bucket)
    return np.array(out).reshape(np.shape(relative_position))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_t5(bidirectional):
    rp = np.arange(-300, 301)
    got = relative_position_bucket(
        jnp.asarray(rp), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    want = reference_bucket(rp, bidirectional)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Hand-derived anchors (key - query): exact buckets up to 7 / 15, log-spaced to the last.
    anchors = {0: 0, -1: 1, -7: 7, -300: 15, 1: 17, 300: 31} if bidirectional else {}
    anchors = anchors or {0: 0, 5: 0, -1: 1, -15: 15, -16: 16, -300: 31}
    for position, bucket in anchors.items():
        assert want[position + 300] == bucket, position


# ----------------------------------------------------------------------------- forward

# Tests share configs and batch structures so that they share compiled programs.
DEEP = dict(num_encoder_layers=2, num_decoder_layers=4, dtype="float32")


def deep_batch(cfg):
    """2 x 8 decoder tokens, 2 x 12 encoder tokens (2 groups of 12)."""
    batch = random_batch(cfg, batch=2, length=8)
    if cfg.is_encoder_decoder:
        batch["encoder_input_tokens"] = np.tile(batch["encoder_input_tokens"], (1, 2))[:, :12]
    return batch


def packed_batch(cfg, dec_segments, enc_segments=None, seed=0):
    """One row of 16 tokens with explicit segment ids; BOS = 0 opens every decoder segment."""
    rng = np.random.default_rng(seed)
    dec_segments = np.asarray([dec_segments], np.int32)
    targets = rng.integers(2, cfg.vocab_size, dec_segments.shape).astype(np.int32)
    targets *= dec_segments > 0
    inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    inputs[dec_segments != np.pad(dec_segments[:, :-1], ((0, 0), (1, 0)))] = 0
    batch = {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_segment_ids": dec_segments,
    }
    if cfg.is_encoder_decoder:
        enc_segments = np.asarray([enc_segments], np.int32)
        tokens = rng.integers(2, cfg.vocab_size, enc_segments.shape).astype(np.int32)
        batch["encoder_input_tokens"] = tokens * (enc_segments > 0)
        batch["encoder_segment_ids"] = enc_segments
    return batch


def test_forward_shapes_and_router_stats():
    cfg = tiny_config(**DEEP)
    logits, stats = forward(make_model(cfg), deep_batch(cfg), train=True)
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert set(stats) == {"encoder", "decoder"}
    for stack, n_sparse in {"encoder": 1, "decoder": 2}.items():
        s = stats[stack]
        assert isinstance(s, RouterStats)
        assert s.aux_loss.shape == (n_sparse,) and s.expert_fraction.shape == (n_sparse, 4)
        np.testing.assert_allclose(np.asarray(s.expert_fraction).sum(-1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(s.aux_loss) > 0)


def test_dense_model_has_no_router_stats():
    cfg = tiny_config(moe=None)
    logits, stats = forward(make_model(cfg), random_batch(cfg))
    assert stats == {"encoder": None, "decoder": None}
    assert logits.dtype == jnp.float32


def test_unpacked_masks_come_from_targets_and_inputs():
    # Decoder inputs start with BOS = 0, which must not count as padding: the implicit segment
    # ids are (targets > 0) and (encoder inputs > 0), identical to passing them explicitly.
    cfg = tiny_config()
    model = make_model(cfg)
    explicit = packed_batch(cfg, [1] * 13 + [0] * 3, [1] * 10 + [0] * 6)
    implicit = {k: v for k, v in explicit.items() if not k.endswith("segment_ids")}
    a, sa = forward(model, implicit, train=True)
    b, sb = forward(model, explicit, train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, y in zip(sa["decoder"], sb["decoder"], strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_decoder_is_causal(architecture):
    cfg = tiny_config(architecture=architecture)
    model = make_model(cfg)
    batch = packed_batch(cfg, [1] * 16, [1] * 16)
    base, stats = forward(model, batch, train=True)  # train: capacity 1.25, tokens do drop
    assert base.shape == (1, 16, cfg.vocab_size) and base.dtype == jnp.float32
    assert set(stats) == ({"encoder", "decoder"} if cfg.is_encoder_decoder else {"decoder"})
    assert float(stats["decoder"].fraction_dropped[0]) > 0
    rng = np.random.default_rng(1)
    for i in (0, 5, 12):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["decoder_input_tokens"][0, i + 1 :] = rng.integers(2, 64, 15 - i)
        logits, _ = forward(model, changed, train=True)
        np.testing.assert_array_equal(np.asarray(logits)[0, : i + 1], np.asarray(base)[0, : i + 1])
        assert not np.allclose(np.asarray(logits)[0, i + 1 :], np.asarray(base)[0, i + 1 :])


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_packed_segments_do_not_attend_across(architecture):
    cfg = tiny_config(architecture=architecture)
    model = make_model(cfg)
    batch = packed_batch(cfg, [1] * 5 + [2] * 8 + [0] * 3, [1] * 6 + [2] * 7 + [0] * 3)
    base, _ = forward(model, batch, train=True)
    rng = np.random.default_rng(2)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_tokens"][0, 6:13] = rng.integers(2, 64, 7)
    if cfg.is_encoder_decoder:
        changed["encoder_input_tokens"][0, 6:13] = rng.integers(2, 64, 7)
    logits, _ = forward(model, changed, train=True)
    np.testing.assert_array_equal(np.asarray(logits)[0, :5], np.asarray(base)[0, :5])
    assert not np.allclose(np.asarray(logits)[0, 5:13], np.asarray(base)[0, 5:13])


# ----------------------------------------------------------------------------- precision


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _equations(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _equations(sub)


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_activations_float32_router_and_logits(tied, monkeypatch):
    cfg = tiny_config(tied_logits=tied)
    # scatter's experts are bfloat16 matmuls on every platform ('auto' on CPU is the fused FFN,
    # whose blocks compute in float32 there: tests/test_moe.py).
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch="scatter"))
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    model = make_model(cfg)
    batch = random_batch(cfg)
    seen = []
    real_router_logits = routing.router_logits

    def spy(x, w, **kw):
        out = real_router_logits(x, w, **kw)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(routing, "router_logits", spy)
    jaxpr = jax.make_jaxpr(lambda: model(batch, train=True))()
    # The router sees the bf16 hidden activations and returns float32 logits (1 per sparse layer).
    assert seen == [(jnp.bfloat16, jnp.float32)] * 2
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    by_width = {}
    for eqn in dots:
        aval = eqn.outvars[0].aval
        by_width.setdefault(aval.shape[-1], set()).add(np.dtype(aval.dtype).name)
    assert by_width[4] == {"float32"}  # router logits [G, T, E]
    assert by_width[cfg.d_ff] == {"bfloat16"}  # dense and expert hidden
    assert by_width[cfg.d_model] == {"bfloat16"}  # attention out, FFN out, dispatch, combine
    assert by_width[cfg.vocab_size] == {"float32"}  # output logits
    assert jaxpr.out_avals[0].dtype == jnp.float32


# ----------------------------------------------------------------------------- scan


def _scanned_params(flat: dict, every: int) -> dict:
    """Map 'stack/blocks/{i}/layers/0/x' to 'stack/blocks/layers/{i % every}/x' stacked on i."""
    grouped: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) > 3 and parts[1] == "blocks":
            i = int(parts[2])
            key = "/".join([parts[0], "blocks", "layers", str(i % every), *parts[5:]])
            grouped.setdefault(key, {})[i // every] = value
        else:
            out[path] = value
    for key, blocks in grouped.items():
        out[key] = np.stack([blocks[b] for b in range(len(blocks))])
    return out


def test_scan_layers_matches_unrolled_layers():
    cfg = tiny_config(**DEEP)
    unrolled = make_model(cfg)
    scanned = make_model(cfg.replace(scan_layers=True), seed=2)
    mapped = _scanned_params(flat_params(unrolled), cfg.moe.sparse_every)
    assert set(mapped) == set(flat_params(scanned))
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten(mapped))
    nnx.update(scanned, state)
    batch = deep_batch(cfg)
    a, sa = forward(unrolled, batch, train=True)
    b, sb = forward(scanned, batch, train=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert sa.keys() == sb.keys() == {"encoder", "decoder"}
    assert sa["encoder"].aux_loss.shape == (1,)
    assert sa["decoder"].aux_loss.shape == (2,)  # decoder layers 1 and 3, in that order
    for stack in sa:
        for x, y in zip(sa[stack], sb[stack], strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # The two sparse decoder layers route differently, so layer order is really checked.
    z = np.asarray(sa["decoder"].router_z_loss)
    assert not np.allclose(z[0], z[1])


# ----------------------------------------------------------------------------- training


def _cross_entropy(logits, targets):
    mask = (targets > 0).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_tiny_model_trains_and_router_learns_from_cross_entropy(architecture):
    cfg = tiny_config(architecture=architecture)
    model = make_model(cfg)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch=4, length=8, seed=3).items()}
    tx = optax.adam(1e-2)

    def loss_fn(params):  # cross-entropy only: any router gradient comes through the gates
        logits, stats = nnx.merge(graphdef, params)(batch, train=True)
        return _cross_entropy(logits, batch["decoder_target_tokens"]), stats

    @jax.jit
    def step(params, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, stats, grads

    opt_state = tx.init(params)
    losses = []
    for i in range(20):
        params, opt_state, loss, stats, grads = step(params, opt_state)
        losses.append(float(loss))
        if i == 0:
            routers = {p: g for p, g in _flat(grads).items() if p.endswith("mlp/router")}
            assert len(routers) == len(cfg.stack_depths())  # one sparse layer per stack
            for path, g in routers.items():
                assert np.isfinite(g).all() and np.abs(g).max() > 0, path
    assert np.isfinite(losses).all()
    # Starts near chance: tied logits of unit-RMS states have std ~1, adding ~0.5 nat.
    assert math.log(cfg.vocab_size) < losses[0] < math.log(cfg.vocab_size) + 1.5
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(np.isfinite(np.asarray(s.aux_loss)).all() for s in stats.values())


def _flat(state) -> dict[str, np.ndarray]:
    return {
        "/".join(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)
    }


# ----------------------------------------------------------------------------- noise knobs


def _two_keys(model, batch, train, kind):
    """Outputs under two different keys of one kind: equal iff that noise is off."""
    outs = [
        forward(model, batch, train=train, keys=Keys(**{kind: jax.random.key(seed)}))
        for seed in (0, 1)
    ]
    return outs


# ----------------------------------------------------------------------------- dropout draws


@pytest.mark.parametrize("rate", [0.1, 0.4, 0.9])
def test_dropout_keeps_its_quantized_probability_and_stays_unbiased(rate):
    kept_by_hand = {0.1: 58982 / 65536, 0.4: 39322 / 65536, 0.9: 6554 / 65536}[rate]
    assert layers.keep_probability(rate) == kept_by_hand  # 1 - round(rate * 2^16) / 2^16
    n = 1 << 22
    keep = np.asarray(jax.jit(lambda k: layers.dropout_mask(k, rate, (1024, 4096)))(KEY))
    p = kept_by_hand
    assert abs(keep.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    x = jnp.full((1024, 4096), 3.0, jnp.float32)
    dropped = np.asarray(layers.drop_with_mask(x, keep, rate))
    np.testing.assert_array_equal(dropped[~keep], 0)
    np.testing.assert_array_equal(dropped[keep], np.float32(3.0) / np.float32(p))


def test_dropout_bits_of_one_hash_are_independent():
    # Four neighbours along the last axis share one threefry hash (two words, split in halves):
    # at rate 0.5 each keeps one bit of its own; all 16 patterns of the four must be equally
    # likely (a copied word or half would make some impossible), in every column of the four.
    keep = np.asarray(layers.dropout_mask(KEY, 0.5, (1 << 14, 16)), np.int64)
    for c in range(0, 16, 4):
        pattern = keep[:, c] * 8 + keep[:, c + 1] * 4 + keep[:, c + 2] * 2 + keep[:, c + 3]
        counts = np.bincount(pattern, minlength=16)
        expected = len(pattern) / 16
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 45, (c, counts)  # 15 degrees of freedom: P(chi2 > 45) ~ 1e-4
    # ... and rows and columns differ from each other.
    assert 0.45 < (keep[1:] != keep[:-1]).mean() < 0.55
    assert 0.45 < (keep[:, 4:] != keep[:, :-4]).mean() < 0.55


def _threefry2x32_numpy(k0, k1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), in NumPy uint32 arithmetic."""
    rotl = lambda v, r: (v << np.uint32(r)) | (v >> np.uint32(32 - r))  # noqa: E731
    ks = [np.uint32(k0), np.uint32(k1), np.uint32(k0) ^ np.uint32(k1) ^ np.uint32(0x1BD11BDA)]
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in (13, 15, 26, 6) if i % 2 == 0 else (17, 29, 16, 24):
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 10), (2, 3, 4, 9), (2, 1, 3, 2, 6)])
def test_dropout_mask_is_its_definition_for_every_rank(shape):
    # Element (lead..., c) keeps iff 16-bit value c % 4 of the hash of (row, c // 4), where row
    # is the flat index over the leading axes, is at least round(rate * 2^16): whatever view
    # the draw is computed over (it is 3-D, for compile time).
    rate = 0.3
    k0, k1 = np.asarray(jax.random.key_data(KEY), np.uint32)
    index = np.indices(shape).reshape(len(shape), -1)
    row = np.ravel_multi_index(index[:-1], shape[:-1]) if len(shape) > 1 else 0 * index[0]
    column = index[-1]
    with np.errstate(over="ignore"):
        w0, w1 = _threefry2x32_numpy(k0, k1, row.astype(np.uint32), (column // 4).astype(np.uint32))
    halves = np.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16])
    value = halves[column % 4, np.arange(column.size)]
    want = (value >= round(rate * 2**16)).reshape(shape)
    got = np.asarray(jax.jit(lambda k: layers.dropout_mask(k, rate, shape))(KEY))
    np.testing.assert_array_equal(got, want)
    assert 0 < want.mean() < 1 or want.size < 8


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_mask_is_the_same_on_every_mesh(impl):
    from jax.sharding import NamedSharding, PartitionSpec

    from switch_jax.parallel import partitioning

    key = jax.random.key(3, impl=impl)
    shape = (4, 8, 6, 20)  # the last axis: 20 = five hashes of four, split over 2 devices
    want = np.asarray(layers.dropout_mask(key, 0.3, shape))
    assert 0.5 < want.mean() < 0.9
    mesh = partitioning.make_mesh((2, 2, 2))
    for spec in (("data", "expert", None, "model"), (None, ("data", "expert", "model"))):
        out = NamedSharding(mesh, PartitionSpec(*spec))
        got = jax.jit(lambda k: layers.dropout_mask(k, 0.3, shape), out_shardings=out)(key)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_dropout_and_expert_dropout_are_separate_knobs():
    cfg = tiny_config(architecture="decoder_only")
    batch = random_batch(cfg)
    # Expert dropout alone, in a model without sparse layers: nothing is dropped.
    dense = make_model(
        cfg.replace(moe=dataclasses.replace(cfg.moe, sparse_every=0, expert_dropout_rate=0.4))
    )
    (a, _), (b, _) = _two_keys(dense, batch, True, "dropout")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and with sparse layers it changes the output although dropout_rate is 0.
    sparse = make_model(cfg.replace(moe=dataclasses.replace(cfg.moe, expert_dropout_rate=0.4)))
    (a, _), (b, _) = _two_keys(sparse, batch, True, "dropout")
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # Ordinary dropout alone also changes it.
    dropped = make_model(cfg.replace(dropout_rate=0.1))
    (a, _), (b, _) = _two_keys(dropped, batch, True, "dropout")
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_jitter_changes_the_model_only_in_training():
    cfg = tiny_config(architecture="decoder_only")
    model = make_model(cfg.replace(moe=dataclasses.replace(cfg.moe, jitter_eps=0.1)))
    batch = random_batch(cfg)
    (a, _), (b, _) = _two_keys(model, batch, False, "jitter")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (_, sa), (_, sb) = _two_keys(model, batch, True, "jitter")
    assert not np.allclose(np.asarray(sa["decoder"].router_z_loss), sb["decoder"].router_z_loss)


def test_decoder_without_targets_keeps_bos_and_causality():
    # Inference batches carry no targets: BOS = 0 at position 0 must still be a real token
    # (before the fix it was masked as padding, so position 0 attended to future tokens).
    cfg = tiny_config(architecture="decoder_only")
    model = make_model(cfg)
    with_targets = packed_batch(cfg, [1] * 16)
    no_targets = {"decoder_input_tokens": with_targets["decoder_input_tokens"]}
    a, _ = forward(model, no_targets)
    b, _ = forward(model, with_targets)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = {"decoder_input_tokens": no_targets["decoder_input_tokens"].copy()}
    changed["decoder_input_tokens"][0, 9] += 1
    c, _ = forward(model, changed)
    np.testing.assert_array_equal(np.asarray(c)[0, :9], np.asarray(a)[0, :9])


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_relative_bias_init_is_t5x_variance_scaling(scale):
    """T5X MoE configs: variance_scaling(SCALE=0.1, 'fan_avg', 'uniform') on the [H, 32] table:
    uniform in +-sqrt(3 * scale / ((H + 32) / 2))."""
    from switch_jax.models.config import ModelConfig
    from switch_jax.models.layers import RelativePositionBias

    cfg = ModelConfig(num_heads=64, relative_bias_init_scale=scale, moe=None)
    table = np.asarray(
        RelativePositionBias(cfg, bidirectional=True, rngs=nnx.Rngs(0)).rel_embedding[...]
    )
    limit = math.sqrt(3 * scale / ((64 + 32) / 2))
    assert table.shape == (64, 32)
    assert np.abs(table).max() <= limit
    assert np.abs(table).max() > 0.95 * limit  # 2048 draws reach the edge
    np.testing.assert_allclose(table.std(), limit / math.sqrt(3), rtol=0.05)
    assert ModelConfig().relative_bias_init_scale == 0.1  # the default is T5X's MoE setting
