"""Decoding: cached steps equal the full forward pass, greedy / sampling / beam search, sharding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switch_jax.decode import decoding, search
from switch_jax.parallel import partitioning
from tests.model_fixtures import forward, make_model, tiny_config

MAX_LEN = 6


def config(architecture: str, scan: bool = False):
    """One sparse layer per stack (two scanned ones), float32; eval capacity = every token of a
    group (4 experts x 4.0 / 4), so no token drops and the grouping of a decoding step (B tokens)
    and of the full pass (B x L tokens) agree."""
    moe = dataclasses.replace(tiny_config().moe, capacity_factor_eval=4.0, sparse_every=1)
    return tiny_config(
        architecture=architecture,
        dtype="float32",
        num_encoder_layers=1,
        num_decoder_layers=2 if scan else 1,
        scan_layers=scan,
        moe=moe,
    )


def inputs(cfg, seed=0) -> dict:
    """4 rows of different lengths, right-padded with 0 (rows 2 and 3 are short)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.vocab_size, (4, 7)).astype(np.int32)
    tokens[2, 4:] = 0
    tokens[3, 2:] = 0
    key = "encoder_input_tokens" if cfg.is_encoder_decoder else "decoder_prompt_tokens"
    return {key: tokens}


def single_device():
    return partitioning.Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])


def decoder(cfg, partitioner, decode_cfg):
    """make_decoder for a bare model config (a Run's model_cfg is adapted to its mesh already)."""
    return decoding.make_decoder(partitioner.adapt_model_config(cfg), partitioner, decode_cfg)


@functools.cache
def model_and_params(architecture: str, scan: bool = False):
    cfg = config(architecture, scan)
    model = make_model(cfg, seed=3)
    return cfg, model, nnx.state(model, nnx.Param)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _cached_logits(graphdef, params, batch, tokens_BL):
    """Logits of the prefill and of every cached step fed `tokens_BL`: [L, B, V]."""
    model = nnx.merge(graphdef, params)
    logits_BV, cache, start = decoding._prefill(model, batch, MAX_LEN)

    def step(carry, token_B):
        cache, i = carry
        logits, cache, _ = model.decode(token_B[:, None], cache, index=start + i)
        return (cache, i + 1), logits[:, 0]

    _, rest = jax.lax.scan(step, (cache, 0), tokens_BL.T[:-1])
    return jnp.concatenate([logits_BV[None], rest])


def full_forward_logits(cfg, model, batch, tokens_BL) -> np.ndarray:
    """Uncached reference: one forward pass over [prompt +] BOS + tokens; logits [B, L, V]."""
    B, L = tokens_BL.shape
    if cfg.is_encoder_decoder:
        dec = np.concatenate([np.zeros((B, 1), np.int32), tokens_BL[:, :-1]], 1)
        full = {
            "encoder_input_tokens": batch["encoder_input_tokens"],
            "decoder_input_tokens": dec,
            "decoder_segment_ids": np.ones_like(dec),
        }
        return np.asarray(forward(model, full)[0])
    prompt = batch["decoder_prompt_tokens"]
    n = (prompt > 0).sum(1)
    T = 1 + prompt.shape[1] + L - 1
    seq, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        row = np.concatenate([[0], prompt[b, : n[b]], tokens_BL[b, :-1]])
        seq[b, : len(row)], seg[b, : len(row)] = row, 1
    logits = np.asarray(
        forward(model, {"decoder_input_tokens": seq, "decoder_segment_ids": seg})[0]
    )
    return np.stack([logits[b, n[b] : n[b] + L] for b in range(B)])


@pytest.fixture(scope="module")
def greedy_single():
    """Greedy outputs per architecture on one device (shared by several tests)."""
    out = {}
    for arch in ("encoder_decoder", "decoder_only"):
        cfg, _, params = model_and_params(arch)
        dec = decoder(cfg, single_device(), decoding.DecodeConfig(MAX_LEN))
        out[arch] = jax.device_get(dec.generate(params, inputs(cfg)))
    return out


@pytest.mark.parametrize(
    "architecture,scan",
    [("encoder_decoder", False), ("decoder_only", False), ("encoder_decoder", True)],
)
def test_cached_steps_equal_the_full_forward_pass(architecture, scan, greedy_single):
    cfg, model, params = model_and_params(architecture, scan)
    batch = inputs(cfg)
    tokens = greedy_single[architecture]["tokens"]  # any tokens would do for the logits
    graphdef = nnx.graphdef(model)
    cached = np.asarray(_cached_logits(graphdef, nnx.state(model), batch, tokens)).swapaxes(0, 1)
    full = full_forward_logits(cfg, model, batch, tokens)
    np.testing.assert_allclose(cached, full, rtol=2e-5, atol=2e-5)
    if scan:  # (a deeper model than the one greedy_single decoded)
        return
    # Greedy tokens are the argmax of the uncached pass at every position up to EOS.
    length = greedy_single[architecture]["length"]
    for b in range(tokens.shape[0]):
        assert (tokens[b, : length[b]] == full[b, : length[b]].argmax(-1)).all(), b
        assert (tokens[b, length[b] :] == 0).all()
    log_p = jax.nn.log_softmax(full, axis=-1)
    want = [log_p[b, np.arange(length[b]), tokens[b, : length[b]]].sum() for b in range(4)]
    np.testing.assert_allclose(greedy_single[architecture]["log_prob"], want, rtol=1e-5)


def _teacher_forced_log_lik(cfg, model, batch, tokens_BNL):
    B, N, L = tokens_BNL.shape
    flat = tokens_BNL.reshape(B * N, L)
    rep = {k: np.repeat(v, N, axis=0) for k, v in batch.items()}
    log_p = jax.nn.log_softmax(full_forward_logits(cfg, model, rep, flat), axis=-1)
    picked = np.take_along_axis(np.asarray(log_p), flat[..., None], -1)[..., 0]
    ended = np.cumsum(flat == 1, axis=1) - (flat == 1)  # 0 up to and including the first EOS
    length = (ended == 0).sum(1)
    return (picked * (ended == 0)).sum(1).reshape(B, N), length.reshape(B, N)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_beam_search_scores_are_penalised_log_likelihoods_in_order(architecture):
    cfg, model, params = model_and_params(architecture)
    batch = inputs(cfg)
    dec = decoder(cfg, single_device(), decoding.DecodeConfig(MAX_LEN, beam_size=4, alpha=0.6))
    out = jax.device_get(dec.generate(params, batch))
    scores = out["beam_scores"]
    assert scores.shape == (4, 4) and (np.diff(scores, axis=1) <= 1e-6).all()
    log_lik, length = _teacher_forced_log_lik(cfg, model, batch, out["beam_tokens"])
    np.testing.assert_allclose(out["beam_log_probs"], log_lik, rtol=1e-4, atol=1e-4)
    penalty = ((5.0 + length) / 6.0) ** 0.6
    np.testing.assert_allclose(scores, log_lik / penalty, rtol=1e-4, atol=1e-4)
    # Distinct hypotheses.
    for b in range(4):
        assert len({tuple(t) for t in out["beam_tokens"][b]}) == 4


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _one_beam(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logits, cache, start = decoding._prefill(model, batch, MAX_LEN)

    def step(tokens, cache, index, alive):
        out, cache, _ = model.decode(
            tokens[:, None], cache, index=index, token_mask_BQ=alive[:, None]
        )
        return out[:, 0], cache

    gather = decoding.cache_gatherer(model.cfg)
    return search.beam_search(
        step, logits, cache, gather, start_index=start, max_length=MAX_LEN, beam_size=1, alpha=0.0
    )


def test_beam_size_one_is_greedy(greedy_single):
    # (DecodeConfig.beam_size=1 takes the sampling path, so the beam search is called directly.)
    cfg, model, _ = model_and_params("encoder_decoder")
    beams = jax.device_get(_one_beam(nnx.graphdef(model), nnx.state(model), inputs(cfg)))
    greedy = greedy_single["encoder_decoder"]
    np.testing.assert_array_equal(beams.tokens_BNL[:, 0], greedy["tokens"])
    np.testing.assert_allclose(beams.log_prob_BN[:, 0], greedy["log_prob"], rtol=1e-5)
    np.testing.assert_array_equal(beams.length_BN[:, 0], greedy["length"])


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_sharded_decoding_equals_single_device(architecture, greedy_single):
    cfg, _, params = model_and_params(architecture)
    mesh = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    dec = decoder(cfg, mesh, decoding.DecodeConfig(MAX_LEN))
    out = dec.generate(params, inputs(cfg))
    assert out["tokens"].sharding.spec[0] == ("data", "expert")
    np.testing.assert_array_equal(np.asarray(out["tokens"]), greedy_single[architecture]["tokens"])
    np.testing.assert_allclose(
        np.asarray(out["log_prob"]), greedy_single[architecture]["log_prob"], rtol=1e-5
    )
    with pytest.raises(decoding.ConfigError, match="divisible by data x expert"):
        dec.generate(params, {k: v[:2] for k, v in inputs(cfg).items()})


# ----------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_filters_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: np.asarray(x[0] > search.NEG_INF / 2)  # noqa: E731
    assert kept(search.filter_logits(logits, top_k=2)).tolist() == [1, 1, 0, 0, 0]
    # Mass before each token: 0, .5, .7, .85, .95 -> top_p=0.7 keeps 2, 0.71 keeps 3.
    assert kept(search.filter_logits(logits, top_p=0.7)).tolist() == [1, 1, 0, 0, 0]
    assert kept(search.filter_logits(logits, top_p=0.71)).tolist() == [1, 1, 1, 0, 0]
    assert kept(search.filter_logits(logits, top_p=0.01)).tolist() == [1, 0, 0, 0, 0]
    np.testing.assert_allclose(search.brevity_penalty(0.6, 3), (8 / 6) ** 0.6, rtol=1e-6)


def test_temperature_sampling_follows_the_tempered_distribution():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))[None].repeat(4000, 0)
    draws = jax.jit(lambda k: search.choose(logits, k, temperature=2.0))(jax.random.PRNGKey(0))
    tempered = np.array([0.6, 0.3, 0.1]) ** 0.5
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(freq, tempered / tempered.sum(), atol=0.03)
    top1 = search.choose(logits[:8], jax.random.PRNGKey(1), temperature=5.0, top_k=1)
    assert (np.asarray(top1) == 0).all()


def test_dropless_decoding_equals_decoding_without_drops(greedy_single):
    # A capacity that drops tokens in every decoding step (0.25 x 4 tokens / 4 experts, no
    # minimum), made harmless by the default dropless routing: the same tokens as capacity
    # routing at a capacity that holds every token (this file's model, routing='capacity').
    cfg, _, params = model_and_params("encoder_decoder")
    roomy = decoding.DecodeConfig(MAX_LEN, routing="capacity")
    want = jax.device_get(decoder(cfg, single_device(), roomy).generate(params, inputs(cfg)))
    np.testing.assert_array_equal(want["tokens"], greedy_single["encoder_decoder"]["tokens"])
    moe = dataclasses.replace(cfg.moe, min_capacity=0, capacity_factor_eval=0.25)
    tight = decoder(cfg.replace(moe=moe), single_device(), decoding.DecodeConfig(MAX_LEN))
    out = jax.device_get(tight.generate(params, inputs(cfg)))
    np.testing.assert_array_equal(out["tokens"], want["tokens"])
    np.testing.assert_allclose(out["log_prob"], want["log_prob"], rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_beam_reorder_equals_the_full_gather_within_examples(scan):
    # Beams are reordered within their example, so the encoder's entries (cross K/V, mask)
    # are left in place; every entry must still equal what the full gather gives.
    cfg, model, _ = model_and_params("encoder_decoder", scan)
    batch = inputs(cfg)
    B, N = 4, 3
    _, cache, _ = decoding._prefill(model, batch, MAX_LEN)
    full = decoding.cache_gatherer(cfg)
    cache_X = full(cache, jnp.repeat(jnp.arange(B), N))
    # Beams that have diverged: each row's self-attention entries made its own.
    axis = 1 if scan else 0  # the batch axis of (scanned) layer caches

    def diverge(path, x):
        if jax.tree_util.keystr(path[-1:]) in ("['cross_k']", "['cross_v']", "['encoder_valid']"):
            return x
        shape = [1] * x.ndim
        shape[axis if "decoder" in jax.tree_util.keystr(path) else 0] = B * N
        return x + jnp.arange(B * N).reshape(shape).astype(x.dtype)

    cache_X = jax.tree_util.tree_map_with_path(diverge, cache_X)
    # Row b * N + n takes beam (n + 1 + b) % N of its own example.
    rows_X = jnp.asarray([b * N + (n + 1 + b) % N for b in range(B) for n in range(N)])
    reorder = decoding.cache_gatherer(cfg, within_examples=True)
    got, want = reorder(cache_X, rows_X), full(cache_X, rows_X)
    leaves = jax.tree_util.tree_leaves_with_path(got)
    assert {jax.tree_util.keystr(p[-1:]) for p, _ in leaves} >= {"['cross_k']", "['k']"}
    before = dict(jax.tree_util.tree_leaves_with_path(cache_X))
    for (path, a), b in zip(leaves, jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
        if "cross" in jax.tree_util.keystr(path):
            assert a is before[path], "the encoder's entries are not copied"
