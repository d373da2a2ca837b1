"""Expert-choice routing (Zhou et al. 2022; flaxformer's ExpertsChooseMaskedRouter): each expert
takes the C tokens of a group with the highest router probability for it.

A token may be taken by several experts or by none (then its output is 0 and the residual
carries it, like a token dropped by token choice). Not causal: whether a token is taken depends
on every other token of its group, so only encoder stacks may route this way (MoeConfig checks).

The result is a `routing.Routing` with P = E picks per token, pick e standing for expert e: kept
iff expert e took the token, slot = its rank among e's C tokens, gate = the router probability
(flaxformer's combine weight). Every capacity dispatch (einsum, scatter, sorted) runs it
unchanged; they cost E picks per token instead of top_k. Unlike flaxformer, padding is never
taken (flaxformer zeroes padding probabilities, but a zero may still be picked).

Legend: G groups, T tokens per group, E experts, C capacity, P picks per token (= E here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switch_jax.models.routing import RouterStats, Routing


def route_expert_choice(
    logits_GTE: jax.Array, token_mask_GT: jax.Array, *, capacity: int
) -> tuple[Routing, RouterStats]:
    """Each expert's top-`capacity` real tokens of its group, and this layer's statistics.

    Statistics: no balancing loss (aux_loss 0, as flaxformer: every expert fills its capacity);
    expert_fraction is each expert's share of the taken (token, expert) pairs; fraction_dropped
    the share of real tokens no expert took; router_confidence the mean over real tokens of the
    summed probabilities of the experts that took it; effective_capacity_factor C * E / T.
    """
    G, T, E = logits_GTE.shape
    real_GT = token_mask_GT.astype(bool)
    probs_GTE = jax.nn.softmax(logits_GTE, axis=-1)
    # Padding scores below any probability, so an expert reaches it only after every real token.
    score_GET = jnp.swapaxes(jnp.where(real_GT[..., None], probs_GTE, -1.0), 1, 2)
    _, token_GEC = jax.lax.top_k(jax.lax.stop_gradient(score_GET), capacity)
    token_GEC = token_GEC.astype(jnp.int32)
    taken_real_GEC = jnp.take_along_axis(real_GT[:, None, :], token_GEC, axis=-1)

    def ranks(token_C, taken_C):  # one expert's C picks -> (slot_T, kept_T)
        rank_C = jnp.arange(capacity, dtype=jnp.int32)
        slot_T = jnp.zeros((T,), jnp.int32).at[token_C].set(rank_C)
        return slot_T, jnp.zeros((T,), bool).at[token_C].set(taken_C)

    slot_GET, kept_GET = jax.vmap(jax.vmap(ranks))(token_GEC, taken_real_GEC)
    kept_GTE = jnp.swapaxes(kept_GET, 1, 2)
    routing = Routing(
        expert_GTP=jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, T, E)),
        slot_GTP=jnp.swapaxes(slot_GET, 1, 2),
        kept_GTP=kept_GTE,
        gate_GTP=jnp.where(kept_GTE, probs_GTE, 0.0),
        capacity=capacity,
    )
    return routing, _stats(logits_GTE, routing.gate_GTP, real_GT, kept_GTE, capacity)


def _stats(logits_GTE, gate_GTE, real_GT, kept_GTE, capacity) -> RouterStats:
    G, T, E = logits_GTE.shape
    real_f = real_GT.astype(jnp.float32)
    n_real = jnp.maximum(real_f.sum(), 1.0)
    kept_f = kept_GTE.astype(jnp.float32)
    z_GT = jax.nn.logsumexp(logits_GTE, axis=-1) ** 2
    taken_GT = jnp.max(kept_f, axis=-1)
    return RouterStats(
        aux_loss=jnp.zeros([], jnp.float32),
        router_z_loss=jnp.sum(z_GT * real_f) / n_real,
        expert_fraction=kept_f.sum((0, 1)) / jnp.maximum(kept_f.sum(), 1.0),
        fraction_dropped=jnp.sum((1.0 - taken_GT) * real_f) / n_real,
        router_confidence=jnp.sum(gate_GTE.sum(-1) * real_f) / n_real,
        effective_capacity_factor=jnp.asarray(capacity * E / T, jnp.float32),
    )
