"""The loss rules, in one place: which target tokens count, their token sums, the router loss
terms, and the one function that assembles the loss.

    weights_BL = target_weights(batch)                   # the tokens every loss counts
    sums, router = forward(graphdef, params, batch, keys, train=True, z_loss=1e-4)
    metrics = finish_metrics(sums, router, model_cfg)    # normalised; metrics["loss"]
    loss, metrics = compute_loss(model_cfg, graphdef, params, batch, keys, train=True)

Sums stay sums (over real target tokens) until `finish_metrics`, so microbatches add them up
first. An `Objective` (e.g. switch_jax.training.distill's) replaces the label cross-entropy as
the sum minimised and may report sums of its own. `total_loss` is the loss, for the gradient and
for the metric alike: minimised + z_loss + aux_loss + router_z_loss, the last three scaled by
their coefficients; aux / router-z over the sparse layers are their mean (T5X) or sum (Mesh TF),
MoeConfig.aux_loss_reduction.

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import Keys
from switch_jax.models.transformer import NO_NOISE


class TokenSums(NamedTuple):
    """Sums over the real target tokens (float32); `finish_metrics` divides them by num_tokens."""

    minimised: jax.Array  # what training minimises: the label cross-entropy unless replaced
    z_loss: jax.Array  # already scaled by its coefficient
    num_tokens: jax.Array
    reported: dict  # cross_entropy, accuracy and an objective's own sums: each / tokens a metric


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step minimises: LABELS (the label cross-entropy) or e.g. distill.py's.

    `token_sums(logits_BLV, batch, *inputs, z_loss) -> TokenSums`, where `inputs` are further
    arguments of the train step (e.g. a teacher's params), passed but not donated.
    """

    token_sums: Callable[..., TokenSums]
    abstract_inputs: tuple = ()  # ShapeDtypeStructs of the inputs, with their target shardings
    load_inputs: Callable[[], tuple] = tuple  # the inputs themselves, read at first use
    init_params: Callable | None = None  # (fresh params, *inputs) -> the params a run starts from


def target_weights(batch: dict) -> jax.Array:
    """[B, L] float32 weight of each target token in every loss and score: the batch's
    decoder_loss_weights (packing and scoring mark the real tokens), else target != 0."""
    weights_BL = batch.get("decoder_loss_weights")
    if weights_BL is None:
        weights_BL = batch["decoder_target_tokens"] > 0
    return weights_BL.astype(jnp.float32)


def token_sums(logits_BLV, batch, z_loss: float) -> TokenSums:
    """Label cross-entropy, z-loss term, correct predictions and count over real target tokens."""
    targets_BL = batch["decoder_target_tokens"]
    weights_BL = target_weights(batch)
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # One-hot product instead of a gather: stays local when the vocab is sharded over 'model'.
    onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.float32)
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    cross_entropy = jnp.sum((lse_BL - target_logit_BL) * weights_BL)
    return TokenSums(
        minimised=cross_entropy,
        z_loss=z_loss * jnp.sum(jnp.square(lse_BL) * weights_BL),
        num_tokens=jnp.sum(weights_BL),
        reported={
            "cross_entropy": cross_entropy,
            "accuracy": jnp.sum(correct_BL * weights_BL),
        },
    )


LABELS = Objective(token_sums)  # the label cross-entropy: no inputs, fresh params


def router_metrics(stats: dict, reduction: str = "mean") -> dict:
    """Per-stack router statistics, plus aux / router-z over all sparse layers: their mean
    (T5X) or sum (Mesh TF), MoeConfig.aux_loss_reduction."""
    out, aux, rz = {}, [], []
    for stack, s in stats.items():
        if s is None:
            continue
        aux.append(s.aux_loss)
        rz.append(s.router_z_loss)
        out[f"{stack}/aux_loss"] = s.aux_loss
        out[f"{stack}/router_z_loss"] = s.router_z_loss
        out[f"{stack}/expert_fraction"] = s.expert_fraction
        out[f"{stack}/fraction_dropped"] = s.fraction_dropped
        out[f"{stack}/router_confidence"] = s.router_confidence
        out[f"{stack}/effective_capacity_factor"] = jnp.mean(s.effective_capacity_factor)
    zero = jnp.zeros([], jnp.float32)
    reduce = jnp.sum if reduction == "sum" else jnp.mean
    out["mean_aux_loss"] = reduce(jnp.concatenate(aux)) if aux else zero
    out["mean_router_z_loss"] = reduce(jnp.concatenate(rz)) if rz else zero
    return out


def router_loss_terms(router: dict, model_cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(aux_loss, router_z_loss) scaled by their coefficients (0 for a dense model)."""
    moe = model_cfg.moe
    # load_balancing='loss_free' balances with the router bias alone (MoeConfig).
    aux_coef = moe.aux_loss_coef if moe and moe.load_balancing != "loss_free" else 0.0
    aux = aux_coef * router["mean_aux_loss"]
    router_z = (moe.router_z_loss_coef if moe else 0.0) * router["mean_router_z_loss"]
    return aux, router_z


def total_loss(sums: TokenSums, router_terms: tuple, tokens, microbatches: int = 1) -> jax.Array:
    """The loss: the token sums over `tokens` plus the router terms (per microbatch, so that k
    microbatches add up to the full batch's loss when `tokens` counts the whole batch)."""
    aux, router_z = router_terms
    return (
        sums.minimised / tokens
        + sums.z_loss / tokens
        + aux / microbatches
        + router_z / microbatches
    )


def forward(
    graphdef,
    params,
    batch,
    keys: Keys,
    *,
    train: bool,
    z_loss: float,
    objective: Objective = LABELS,
    inputs: tuple = (),
) -> tuple[TokenSums, dict]:
    """(token sums, router metrics) of one batch: `objective`'s sums, given its `inputs`."""
    model = nnx.merge(graphdef, params)
    logits_BLV, stats = model(batch, train=train, keys=keys)
    moe = model.cfg.moe
    router = router_metrics(stats, moe.aux_loss_reduction if moe is not None else "mean")
    return objective.token_sums(logits_BLV, batch, *inputs, z_loss), router


def finish_metrics(sums: TokenSums, router: dict, model_cfg: ModelConfig) -> dict:
    """Normalise token sums by the real target tokens and add the router loss terms."""
    n = jnp.maximum(sums.num_tokens, 1.0)
    terms = router_loss_terms(router, model_cfg)
    metrics = {k: v for k, v in router.items() if not k.startswith("mean_")}
    metrics["z_loss"] = sums.z_loss / n
    metrics["aux_loss"], metrics["router_z_loss"] = terms
    metrics["num_tokens"] = sums.num_tokens
    for name, value in sums.reported.items():
        metrics[name] = value / n
    metrics["loss"] = total_loss(sums, terms, n)
    return metrics


def compute_loss(
    model_cfg: ModelConfig,
    graphdef,
    params,
    batch: dict,
    keys: Keys = NO_NOISE,
    *,
    train: bool = True,
) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one batch; differentiable in `params` (an nnx.State of Params)."""
    sums, router = forward(graphdef, params, batch, keys, train=train, z_loss=model_cfg.z_loss)
    metrics = finish_metrics(sums, router, model_cfg)
    return metrics["loss"], metrics
