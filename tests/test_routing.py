"""Router math against a token-by-token NumPy reference written here (REFERENCE §1.1, 1.8, 3.2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_jax.models import routing
from switch_jax.models.config import ConfigError

# ----------------------------------------------------------------------------- reference


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_route(logits, mask, *, top_k, capacity, batch_prioritized=False):
    """Plain loops: slots handed out in token order, every first choice before any second."""
    G, T, E = logits.shape
    probs = _softmax(logits)
    expert = np.zeros((G, T, top_k), np.int64)
    slot = np.full((G, T, top_k), -1, np.int64)
    kept = np.zeros((G, T, top_k), bool)
    gate = np.zeros((G, T, top_k))
    for g in range(G):
        order = list(range(T))
        if batch_prioritized:  # most confident real tokens first, ties in token order
            order = sorted(order, key=lambda t: (not mask[g, t], -probs[g, t].max(), t))
        for t in range(T):
            expert[g, t] = np.argsort(-probs[g, t], kind="stable")[:top_k]
        used = np.zeros(E, np.int64)
        for k in range(top_k):
            for t in order:
                if not mask[g, t]:
                    continue
                e = expert[g, t, k]
                slot[g, t, k] = used[e]
                used[e] += 1
                if slot[g, t, k] < capacity:
                    kept[g, t, k] = True
                    gate[g, t, k] = probs[g, t, e]
    return expert, slot, kept, gate


def reference_stats(logits, mask, expert, kept, capacity):
    G, T, E = logits.shape
    K = expert.shape[-1]
    probs = _softmax(logits)
    aux_per_group = []
    for g in range(G):
        real = [t for t in range(T) if mask[g, t]]
        f = np.zeros(E)  # counted before capacity drops
        p = np.zeros(E)
        for t in real:
            for e in set(expert[g, t]):
                f[e] += 1
            p += probs[g, t]
        n = max(len(real), 1)
        aux_per_group.append(E * np.sum(f / n * p / n))
    real_idx = [(g, t) for g in range(G) for t in range(T) if mask[g, t]]
    n_real = len(real_idx)
    lse = [np.log(np.sum(np.exp(np.asarray(logits[g, t], np.float64)))) for g, t in real_idx]
    usage = np.zeros(E)
    dropped = 0
    confidence = 0.0
    for g, t in real_idx:
        for k in range(K):
            usage[expert[g, t, k]] += 1
            dropped += not kept[g, t, k]
            confidence += probs[g, t, expert[g, t, k]]
    return dict(
        aux_loss=np.mean(aux_per_group),
        router_z_loss=np.mean(np.square(lse)),
        expert_fraction=usage / (n_real * K),
        fraction_dropped=dropped / (n_real * K),
        router_confidence=confidence / n_real,
        effective_capacity_factor=capacity * E / (T * K),
    )


# ----------------------------------------------------------------------------- helpers

# One compile per case instead of one per eager op (op-by-op dominates a cold-cache run).
jit_route = jax.jit(routing.route, static_argnames=("top_k", "capacity", "batch_prioritized"))
jit_router_logits = jax.jit(routing.router_logits, static_argnames=("jitter_eps",))


def _case(seed, G=2, T=12, E=4, pad=0.0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((G, T, E))).astype(np.float32)
    mask = rng.random((G, T)) >= pad
    return logits, mask


def _check_against_reference(logits, mask, *, top_k, capacity, batch_prioritized=False):
    route, stats = jit_route(
        jnp.asarray(logits),
        jnp.asarray(mask),
        top_k=top_k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
    )
    expert, slot, kept, gate = reference_route(
        logits, mask, top_k=top_k, capacity=capacity, batch_prioritized=batch_prioritized
    )
    real = np.broadcast_to(mask[..., None], expert.shape)
    np.testing.assert_array_equal(np.asarray(route.kept_GTP), kept)
    np.testing.assert_array_equal(np.asarray(route.expert_GTP)[real], expert[real])
    np.testing.assert_array_equal(np.asarray(route.slot_GTP)[real], slot[real])
    np.testing.assert_allclose(np.asarray(route.gate_GTP), gate, rtol=1e-5, atol=1e-7)
    assert route.capacity == capacity
    want = reference_stats(logits, mask, expert, kept, capacity)
    for name, value in want.items():
        np.testing.assert_allclose(
            np.asarray(getattr(stats, name)), value, rtol=1e-5, atol=1e-7, err_msg=name
        )
    return route, stats, (expert, slot, kept, gate)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("capacity", [1, 2, 3, 12])
def test_top1_matches_reference(capacity):
    logits, mask = _case(0)
    route, _, (_, slot, kept, _) = _check_against_reference(
        logits, mask, top_k=1, capacity=capacity
    )
    if capacity < 12:
        assert not kept.all(), "the case must drop tokens"
    else:
        assert kept.all()
    # A dropped token has gate exactly 0, a kept one the un-renormalised softmax probability.
    probs = _softmax(logits)
    gate = np.asarray(route.gate_GTP)[..., 0]
    assert np.all(gate[~kept[..., 0]] == 0.0)
    np.testing.assert_allclose(gate[kept[..., 0]], probs.max(-1)[kept[..., 0]], rtol=1e-6)
    assert np.all(gate[kept[..., 0]] < 1.0)


def test_slots_are_zero_based_cumsum_in_token_order():
    # Hand-derived: 6 tokens, experts chosen 0,1,0,0,1,0 -> slots 0,0,1,2,1,3; capacity 2 keeps
    # the first two tokens of each expert.
    choice = [0, 1, 0, 0, 1, 0]
    logits = np.full((1, 6, 2), -3.0, np.float32)
    logits[0, np.arange(6), choice] = 3.0
    route, _ = jit_route(jnp.asarray(logits), np.ones((1, 6), bool), top_k=1, capacity=2)
    np.testing.assert_array_equal(np.asarray(route.slot_GTP)[0, :, 0], [0, 0, 1, 2, 1, 3])
    np.testing.assert_array_equal(np.asarray(route.kept_GTP)[0, :, 0], [1, 1, 1, 0, 1, 0])


def test_padding_excluded_from_slots_and_losses():
    logits, mask = _case(1, pad=0.3)
    assert not mask.all()
    route, stats, _ = _check_against_reference(logits, mask, top_k=1, capacity=2)
    assert not np.asarray(route.kept_GTP)[~mask].any()
    assert np.all(np.asarray(route.gate_GTP)[~mask] == 0.0)
    # Real tokens get the same slots as when the padding is removed altogether.
    g = 0
    real = np.flatnonzero(mask[g])
    alone, _ = jit_route(
        jnp.asarray(logits[g : g + 1, real]), np.ones((1, real.size), bool), top_k=1, capacity=2
    )
    np.testing.assert_array_equal(
        np.asarray(route.slot_GTP)[g, real], np.asarray(alone.slot_GTP)[0]
    )
    # Padding logits do not move any loss or statistic.
    noisy = logits.copy()
    noisy[~mask] = 50.0 * np.random.default_rng(2).standard_normal(noisy[~mask].shape)
    _, stats2 = jit_route(jnp.asarray(noisy), jnp.asarray(mask), top_k=1, capacity=2)
    for a, b in zip(stats, stats2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("capacity", [2, 4, 24])
def test_top2_matches_reference_first_choices_have_priority(capacity):
    logits, mask = _case(3, T=12, E=4, pad=0.2)
    route, _, (expert, slot, kept, _) = _check_against_reference(
        logits, mask, top_k=2, capacity=capacity
    )
    # Every first choice of an expert precedes (has a lower slot than) every second choice.
    for g in range(logits.shape[0]):
        for e in range(logits.shape[2]):
            first = slot[g, :, 0][(expert[g, :, 0] == e) & mask[g]]
            second = slot[g, :, 1][(expert[g, :, 1] == e) & mask[g]]
            if first.size and second.size:
                assert first.max() < second.min()
    if capacity == 2:
        assert not kept[..., 1][mask].all(), "the case must drop second choices"


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_prioritized_routing_matches_reference(top_k):
    logits, mask = _case(4, T=16, E=4, pad=0.2)
    _, _, (_, _, kept, _) = _check_against_reference(
        logits, mask, top_k=top_k, capacity=2, batch_prioritized=True
    )
    # The most confident real tokens are the ones that keep their first choice.
    probs = _softmax(logits).max(-1)
    for g in range(logits.shape[0]):
        k0 = kept[g, :, 0]
        if k0.any() and (~k0 & mask[g]).any():
            # Within one expert, every kept token is more confident than every dropped one.
            expert = np.argmax(logits[g], -1)
            for e in range(logits.shape[2]):
                sel = mask[g] & (expert == e)
                if (sel & k0).any() and (sel & ~k0).any():
                    assert probs[g][sel & k0].min() >= probs[g][sel & ~k0].max()


def test_aux_loss_is_one_when_routing_is_uniform():
    # 3 tokens per expert, token t sends most of its mass to expert t % E; by symmetry every
    # expert gets f = 1/E of the tokens and P = 1/E of the probability: E * sum(1/E * 1/E) = 1.
    E, per = 4, 3
    T = E * per
    logits = np.zeros((2, T + 3, E), np.float32)
    logits[:, np.arange(T), np.arange(T) % E] = 2.5
    mask = np.zeros((2, T + 3), bool)
    mask[:, :T] = True
    logits[:, T:] = [9.0, 0.0, 0.0, 0.0]  # padding that would unbalance the loss if counted
    _, stats = jit_route(jnp.asarray(logits), jnp.asarray(mask), top_k=1, capacity=per)
    np.testing.assert_allclose(np.asarray(stats.expert_fraction), np.full(E, 1 / E), rtol=1e-6)
    np.testing.assert_allclose(float(stats.aux_loss), 1.0, rtol=1e-6)
    alpha = 1e-2  # MoeConfig.aux_loss_coef default: the paper's alpha
    np.testing.assert_allclose(alpha * float(stats.aux_loss), alpha, rtol=1e-6)
    assert float(stats.fraction_dropped) == 0.0


def test_aux_loss_counts_f_before_dropping():
    # Every token picks expert 0 with probability p; capacity 1 drops all but one token, yet
    # f_0 = 1 (counted before dropping): aux = E * (1 * p) = E * p (hand-derived).
    E, T = 4, 8
    logits = np.zeros((1, T, E), np.float32)
    logits[..., 0] = 2.0
    p = math.exp(2.0) / (math.exp(2.0) + 3)
    _, stats = jit_route(jnp.asarray(logits), np.ones((1, T), bool), top_k=1, capacity=1)
    np.testing.assert_allclose(float(stats.aux_loss), E * p, rtol=1e-6)
    np.testing.assert_allclose(float(stats.fraction_dropped), (T - 1) / T, rtol=1e-6)
    np.testing.assert_allclose(float(stats.router_confidence), p, rtol=1e-6)
    np.testing.assert_allclose(float(stats.router_z_loss), math.log(math.exp(2) + 3) ** 2, 1e-6)


def test_aux_loss_gradient_flows_only_through_p():
    logits, mask = _case(5)

    def aux(x):
        return jit_route(x, jnp.asarray(mask), top_k=1, capacity=3)[1].aux_loss

    grad = np.asarray(jax.jit(jax.grad(aux))(jnp.asarray(logits)))
    # Reference: d/dlogits of E * mean_g sum_e f_e * P_e with f held constant.
    G, T, E = logits.shape
    expert, *_ = reference_route(logits, mask, top_k=1, capacity=3)
    probs = _softmax(logits)
    want = np.zeros_like(grad, dtype=np.float64)
    for g in range(G):
        n = mask[g].sum()
        f = np.bincount(expert[g, mask[g], 0], minlength=E) / n
        for t in np.flatnonzero(mask[g]):
            p = probs[g, t]
            dp = np.diag(p) - np.outer(p, p)  # dp_e / dlogit_j
            want[g, t] = E / G * (f / n) @ dp
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


def test_statistics_in_eval_and_train_capacity():
    logits, mask = _case(6, G=3, T=16, E=8, pad=0.1)
    for cf in (1.0, 2.0):
        capacity = routing.expert_capacity(16, 8, cf, 1)
        _, stats, _ = _check_against_reference(logits, mask, top_k=1, capacity=capacity)
        np.testing.assert_allclose(float(stats.effective_capacity_factor), cf, rtol=1e-6)


# ----------------------------------------------------------------------------- capacity, groups


@pytest.mark.parametrize(
    "tokens, experts, cf, min_cap, want",
    [
        (1024, 8, 1.25, 4, 160),  # round(160.0)
        (100, 8, 1.25, 4, 16),  # round(15.625)
        (10, 8, 1.0, 4, 4),  # round(1.25) = 1 < min_capacity
        (512, 2048, 1.0, 2, 2),  # Switch-C: 0.25 tokens per expert -> min capacity
        (16, 8, 1.25, 1, 2),  # round(2.5) = 2 (Python/flaxformer round half to even)
        (24, 8, 1.25, 1, 4),  # round(3.75)
        (4, 2, 4.0, 4, 4),  # never more slots than tokens in the group
    ],
)
def test_expert_capacity_formula(tokens, experts, cf, min_cap, want):
    assert routing.expert_capacity(tokens, experts, cf, min_cap) == want


def test_expert_capacity_rejects_bad_factor():
    with pytest.raises(ConfigError):
        routing.expert_capacity(16, 4, 0.0, 1)


def _reference_groups(tokens, group_size, partitions):
    ok = [
        g
        for g in range(1, tokens + 1)
        if tokens % g == 0 and g % partitions == 0 and tokens // g <= group_size
    ]
    return min(ok) if ok else None


@pytest.mark.parametrize(
    "tokens, group_size, partitions",
    [(4096, 1024, 1), (12, 5, 1), (14, 5, 1), (16, 16, 4), (2048 * 512, 2048, 8), (8, 100, 1)],
)
def test_num_groups_matches_brute_force(tokens, group_size, partitions):
    g = routing.num_groups(tokens, group_size, partitions)
    assert g == _reference_groups(tokens, group_size, partitions)
    assert tokens % g == 0 and tokens // g <= group_size and g % partitions == 0


@pytest.mark.parametrize("tokens, group_size, partitions", [(6, 4, 4), (7, 2, 2), (9, 3, 2)])
def test_num_groups_errors_when_tokens_cannot_be_grouped(tokens, group_size, partitions):
    assert _reference_groups(tokens, group_size, partitions) is None
    with pytest.raises(ConfigError, match="group_size"):
        routing.num_groups(tokens, group_size, partitions)


# ----------------------------------------------------------------------------- logits, jitter


def test_router_logits_float32_from_bfloat16_input():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    w = (0.1 * rng.standard_normal((32, 4))).astype(np.float32)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    logits = jit_router_logits(x_bf16, jnp.asarray(w))
    assert logits.dtype == jnp.float32
    # Computed in float32 from the bf16 values: error ~1e-6, not the ~1e-2 of a bf16 matmul.
    want = np.asarray(x_bf16, np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)
    bf16_matmul = np.asarray(jnp.einsum("gtd,de->gte", x_bf16, jnp.asarray(w, jnp.bfloat16)))
    assert (
        np.abs(bf16_matmul.astype(np.float64) - want).max()
        > 10 * np.abs(np.asarray(logits) - want).max()
    )


def test_jitter_is_multiplicative_on_the_router_input():
    # With W = identity the logits are the (jittered) router input itself.
    eps = 0.05
    rng = np.random.default_rng(8)
    x = (rng.random((2, 64, 8)) + 0.5).astype(np.float32)
    w = jnp.eye(8, dtype=jnp.float32)
    key = jax.random.key(0)
    clean = np.asarray(jit_router_logits(jnp.asarray(x), w))
    np.testing.assert_array_equal(clean, x)
    noisy = np.asarray(jit_router_logits(jnp.asarray(x), w, jitter_eps=eps, jitter_key=key))
    ratio = noisy / x
    assert np.all(ratio >= 1 - eps - 1e-6) and np.all(ratio <= 1 + eps + 1e-6)
    assert ratio.std() > eps / 4, "noise must be spread over (1-eps, 1+eps)"
    assert abs(ratio.mean() - 1) < eps / 10
    # No key or eps = 0: no noise.
    np.testing.assert_array_equal(
        np.asarray(jit_router_logits(jnp.asarray(x), w, jitter_eps=eps)), x
    )
    np.testing.assert_array_equal(
        np.asarray(jit_router_logits(jnp.asarray(x), w, jitter_eps=0.0, jitter_key=key)), x
    )
