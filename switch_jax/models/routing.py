"""Router math only: float32 logits, jitter, top-k choice, capacity, aux and z losses, statistics.

Legend: G groups, T tokens per group, D d_model, E experts, P experts per token (the top-k
picks), C capacity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from switch_jax.models.config import ConfigError


class Routing(NamedTuple):
    """Where every token goes. Dropped or padding assignments have `kept=False` and gate 0."""

    expert_GTP: jax.Array  # int32 expert chosen for each of the P assignments of a token
    slot_GTP: jax.Array  # int32 position inside that expert's buffer (meaningless if not kept)
    kept_GTP: jax.Array  # bool: assignment fits in capacity and the token is real
    gate_GTP: jax.Array  # float32 router probability of the chosen expert, 0 where not kept
    capacity: int | None  # None: dropless (no capacity, slots unused)


class SecondExpert(NamedTuple):
    """Mesh TF's policy for the second expert of 'mesh_tf_top2' (moe.py `_top_2_gating`)."""

    policy: str  # all | none | threshold (gate_2 > threshold) | random (see route)
    threshold: float
    uniform_GT: jax.Array | None = None  # Uniform[0, 1) draws, used by 'random'


class RouterStats(NamedTuple):
    """Per-layer router health, returned as values so they survive jit and scan."""

    aux_loss: jax.Array  # E * sum_e f_e P_e, mean over groups: 1.0 when perfectly balanced
    router_z_loss: jax.Array  # mean over real tokens of logsumexp(logits)^2
    expert_fraction: jax.Array  # [E] fraction of real token assignments sent to each expert
    fraction_dropped: jax.Array  # fraction of real token assignments over capacity
    router_confidence: jax.Array  # mean over real tokens of the summed top-k probabilities
    # C * E / (T * P): the capacity factor really used. Dropless: the one the busiest expert
    # of the busiest group needed (no assignment dropped at or above it).
    effective_capacity_factor: jax.Array


def expert_capacity(
    tokens_per_group: int, num_experts: int, capacity_factor: float, min_capacity: int
) -> int:
    """Slots per expert and group: max(round(cf * T / E), min_capacity), at most T."""
    if capacity_factor <= 0:
        raise ConfigError(f"capacity factor must be > 0, got {capacity_factor}")
    capacity = max(int(round(capacity_factor * tokens_per_group / num_experts)), min_capacity)
    # More than T slots could never fill (an expert gets at most every token of its group);
    # at least 1 even with min_capacity=0, so that no expert buffer is empty.
    return max(1, min(capacity, tokens_per_group))


def num_groups(num_tokens: int, group_size: int, num_expert_partitions: int = 1) -> int:
    """Smallest G >= ceil(tokens / group_size) that divides the tokens and is a multiple of the
    expert partitions (flaxformer's rule), so every group has the same token count."""
    start = max(math.ceil(num_tokens / group_size), 1)
    for g in range(start, num_tokens + 1):
        if num_tokens % g == 0 and g % num_expert_partitions == 0:
            return g
    raise ConfigError(
        f"cannot split {num_tokens} tokens into groups of at most {group_size} whose count is a "
        f"multiple of the expert partitions ({num_expert_partitions}); change the batch size, "
        f"the sequence length or MoeConfig.group_size"
    )


def router_logits(
    x_GTD: jax.Array,
    w_DE: jax.Array,
    *,
    jitter_eps: float = 0.0,
    jitter_key: jax.Array | None = None,
    dtype: str = "float32",
) -> jax.Array:
    """float32 logits from a float32 copy of the input (selective precision, paper Table 2).

    `dtype='bfloat16'` runs the router (logits, softmax, gates, losses) in bfloat16: only for
    reproducing the paper's unstable baseline of Table 2.

    Multiplicative jitter Uniform(1-eps, 1+eps) touches the router input only, so the experts
    still see the clean representation (Mesh TF `input_jitter`).
    """
    x_GTD = x_GTD.astype(dtype)
    if jitter_eps > 0 and jitter_key is not None:
        # Drawn over the [G*T, D] view: the same values (an element's counter is its flat index),
        # and XLA:CPU compiles the 2-D draw in half the time of the 3-D one.
        G, T, D = x_GTD.shape
        noise_ND = jax.random.uniform(
            jitter_key, (G * T, D), dtype, 1.0 - jitter_eps, 1.0 + jitter_eps
        )
        x_GTD = x_GTD * noise_ND.reshape(G, T, D)
    return jnp.einsum("gtd,de->gte", x_GTD, w_DE.astype(dtype))


def route(
    logits_GTE: jax.Array,
    token_mask_GT: jax.Array,
    *,
    top_k: int,
    capacity: int | None,
    batch_prioritized: bool = False,
    bias_E: jax.Array | None = None,
    second: SecondExpert | None = None,
) -> tuple[Routing, RouterStats]:
    """Choose experts, assign capacity slots in token order and compute losses and statistics.

    `capacity=None` routes dropless: every real token's assignments are kept, no slots.
    Softmax runs over all experts before the top-k choice, so with k=1 the gate is a real
    probability that carries gradient to the router (unlike softmax over the selected logits).
    First choices of all tokens take slots before any second choice (GShard priority).

    `bias_E` (loss-free balancing) is added to the logits for the choice only: the gate stays
    the unbiased probability. `second` makes top-2 Mesh TF's (the paper's Table 1 MoE): gates
    renormalised over the two picks, the second pick used per `second.policy` ('random': with
    probability min(1, gate_2 / threshold), i.e. iff uniform < gate_2 / threshold), and the aux
    loss counting first picks only.
    """
    G, T, E = logits_GTE.shape
    real_GT = token_mask_GT.astype(bool)
    probs_GTE = jax.nn.softmax(logits_GTE, axis=-1)
    if bias_E is None:
        raw_gate_GTP, expert_GTP = _top_k(probs_GTE, top_k)
    else:
        _, expert_GTP = _top_k(logits_GTE + jax.lax.stop_gradient(bias_E), top_k)
        onehot_GTPE = jax.nn.one_hot(expert_GTP, E, dtype=probs_GTE.dtype)
        raw_gate_GTP = jnp.einsum("gtpe,gte->gtp", onehot_GTPE, probs_GTE)
    wants_GTP = jnp.broadcast_to(real_GT[..., None], expert_GTP.shape)
    gate_GTP, aux_picks = raw_gate_GTP, top_k
    if second is not None:
        gate_GTP = raw_gate_GTP / (jnp.sum(raw_gate_GTP, -1, keepdims=True) + 1e-9)
        use_second_GT = _second_expert_used(gate_GTP[..., 1], second)
        wants_GTP = wants_GTP & jnp.stack([jnp.ones_like(use_second_GT), use_second_GT], -1)
        aux_picks = 1  # Mesh TF's density_1: the first choice only

    if capacity is None:
        slot_GTP, kept_GTP = jnp.zeros_like(expert_GTP), wants_GTP
    else:
        order_GT = _priority_order(probs_GTE, real_GT) if batch_prioritized else None
        slot_GTP = _slots_in_priority_order(expert_GTP, wants_GTP, order_GT, E)
        kept_GTP = wants_GTP & (slot_GTP < capacity)
    routing = Routing(
        expert_GTP=expert_GTP,
        slot_GTP=slot_GTP,
        kept_GTP=kept_GTP,
        gate_GTP=jnp.where(kept_GTP, gate_GTP, 0.0),
        capacity=capacity,
    )
    stats = _stats(
        logits_GTE,
        probs_GTE,
        expert_GTP,
        raw_gate_GTP,
        real_GT,
        wants_GTP,
        kept_GTP,
        capacity,
        aux_picks,
    )
    return routing, stats


def _second_expert_used(gate2_GT: jax.Array, second: SecondExpert) -> jax.Array:
    if second.policy == "all":
        return jnp.ones(gate2_GT.shape, bool)
    if second.policy == "none":
        return jnp.zeros(gate2_GT.shape, bool)
    if second.policy == "threshold":
        return gate2_GT > second.threshold
    if second.uniform_GT is None:
        raise ValueError("second_expert_policy 'random' needs uniform draws")
    return second.uniform_GT < gate2_GT / max(second.threshold, 1e-9)


def _top_k(probs_GTE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """k rounds of max/argmax: lax.top_k makes XLA all-gather the probabilities across batch
    shards (measured), while these reductions stay local to each token's shard."""
    gates, experts = [], []
    remaining_GTE = probs_GTE
    for _ in range(k):
        expert_GT = jnp.argmax(remaining_GTE, axis=-1).astype(jnp.int32)
        gates.append(jnp.max(remaining_GTE, axis=-1))
        experts.append(expert_GT)
        chosen_GTE = jax.nn.one_hot(expert_GT, probs_GTE.shape[-1], dtype=bool)
        remaining_GTE = jnp.where(chosen_GTE, -jnp.inf, remaining_GTE)
    return jnp.stack(gates, -1), jnp.stack(experts, -1)


def _priority_order(probs_GTE, real_GT):
    """Batch-prioritized token order: by descending confidence, padding last, ties in order."""
    confidence_GT = jnp.where(real_GT, probs_GTE.max(-1), -1.0)
    return jnp.argsort(-confidence_GT, axis=-1, stable=True).astype(jnp.int32)


def _slots_in_priority_order(expert_GTP, wants_GTP, order_GT, num_experts):
    """0-based position of each assignment in its expert's queue (cumsum over priority order;
    `order_GT=None` is token order, which needs no permutation)."""
    G, T, P = expert_GTP.shape
    take = jax.vmap(lambda a, idx: a[idx])
    onehot_GTPE = jax.nn.one_hot(expert_GTP, num_experts, dtype=jnp.int32)
    onehot_GTPE = onehot_GTPE * wants_GTP[..., None]
    if order_GT is not None:
        onehot_GTPE = take(onehot_GTPE, order_GT)
    # Priority runs over (pick, token): every first choice, then every second choice.
    ordered_GPTE = jnp.swapaxes(onehot_GTPE, 1, 2)
    position_GPTE = jnp.cumsum(ordered_GPTE.reshape(G, P * T, num_experts), axis=1)
    position_GPTE = position_GPTE.reshape(G, P, T, num_experts) - 1
    slot_GPT = jnp.sum(position_GPTE * ordered_GPTE, axis=-1)
    slot_ordered_GTP = jnp.swapaxes(slot_GPT, 1, 2)
    if order_GT is None:
        return slot_ordered_GTP.astype(jnp.int32)
    inverse_GT = jnp.argsort(order_GT, axis=-1)
    return take(slot_ordered_GTP, inverse_GT).astype(jnp.int32)


def _stats(
    logits_GTE, probs_GTE, expert_GTP, gate_GTP, real_GT, wants_GTP, kept_GTP, capacity, aux_picks
):
    G, T, E = probs_GTE.shape
    P = expert_GTP.shape[-1]
    real_f = real_GT.astype(jnp.float32)
    n_real_G = jnp.maximum(real_f.sum(-1), 1.0)
    # f counts the router's choice before capacity drops (paper Eq. 5, Mesh TF density_1).
    chosen_GTE = jnp.max(jax.nn.one_hot(expert_GTP[..., :aux_picks], E, dtype=jnp.float32), -2)
    f_GE = jnp.einsum("gte,gt->ge", chosen_GTE, real_f) / n_real_G[:, None]
    p_GE = jnp.einsum("gte,gt->ge", probs_GTE, real_f) / n_real_G[:, None]
    aux = jnp.mean(jnp.sum(f_GE * p_GE, axis=-1)) * E

    n_real = jnp.maximum(real_f.sum(), 1.0)
    z_GT = jax.nn.logsumexp(logits_GTE, axis=-1) ** 2
    router_z = jnp.sum(z_GT * real_f) / n_real
    wants_f = wants_GTP.astype(jnp.float32)
    assigned = jnp.maximum(wants_f.sum(), 1.0)
    load_GE = jnp.einsum("gtpe,gtp->ge", jax.nn.one_hot(expert_GTP, E), wants_f)
    expert_fraction = load_GE.sum(0) / assigned
    dropped = jnp.sum(wants_f * (1.0 - kept_GTP.astype(jnp.float32))) / assigned
    confidence = jnp.sum(gate_GTP.sum(-1) * real_f) / n_real
    if capacity is None:
        effective = jnp.max(load_GE) * E / (T * P)
    else:
        effective = jnp.asarray(capacity * E / (T * P), jnp.float32)
    return RouterStats(
        aux_loss=aux,
        router_z_loss=router_z,
        expert_fraction=expert_fraction,
        fraction_dropped=dropped,
        router_confidence=confidence,
        effective_capacity_factor=effective,
    )
