"""The training objective: token sums of cross-entropy and z-loss, router loss terms, metrics.

    sums, router = forward(graphdef, params, batch, keys, train=True, z_loss=1e-4)
    metrics = finish_metrics(sums, router, model_cfg)     # normalised; metrics["loss"]
    loss, metrics = compute_loss(model_cfg, graphdef, params, batch, keys, train=True)

Sums stay sums (over real target tokens) until `finish_metrics`, so microbatches and custom
objectives (switch_jax.training.distill: `objective` and `soft_cross_entropy` sums) add them up
first.
loss = cross_entropy (or the objective) + z_loss + aux_loss + router_z_loss, the last three
scaled by their coefficients; aux / router-z over the sparse layers are their mean (T5X) or sum
(Mesh TF), MoeConfig.aux_loss_reduction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import Keys
from switch_jax.models.transformer import NO_NOISE


def token_sums(logits_BLV, batch, z_loss: float) -> dict:
    """Sums over real target tokens (float32): cross-entropy, z-loss term, correct, count."""
    targets_BL = batch["decoder_target_tokens"]
    weights_BL = batch.get("decoder_loss_weights")
    weights_BL = (targets_BL > 0) if weights_BL is None else weights_BL
    weights_BL = weights_BL.astype(jnp.float32)
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # One-hot product instead of a gather: stays local when the vocab is sharded over 'model'.
    onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.float32)
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return {
        "cross_entropy": jnp.sum((lse_BL - target_logit_BL) * weights_BL),
        "z_loss": z_loss * jnp.sum(jnp.square(lse_BL) * weights_BL),
        "accuracy": jnp.sum(correct_BL * weights_BL),
        "num_tokens": jnp.sum(weights_BL),
    }


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


def forward(
    graphdef, params, batch, keys: Keys, *, train: bool, z_loss: float, objective=None, extra=()
):
    model = nnx.merge(graphdef, params)
    logits_BLV, stats = model(batch, train=train, keys=keys)
    moe = model.cfg.moe
    router = router_metrics(stats, moe.aux_loss_reduction if moe is not None else "mean")
    if objective is None:
        return token_sums(logits_BLV, batch, z_loss), router
    return objective(logits_BLV, batch, *extra, z_loss), router


OBJECTIVE_SUMS = ("objective", "soft_cross_entropy")


def finish_metrics(sums: dict, router: dict, model_cfg: ModelConfig) -> dict:
    """Normalise token sums by the real target tokens and add the router loss terms."""
    n = jnp.maximum(sums["num_tokens"], 1.0)
    moe = model_cfg.moe
    metrics = {k: v for k, v in router.items() if not k.startswith("mean_")}
    metrics["cross_entropy"] = sums["cross_entropy"] / n
    metrics["z_loss"] = sums["z_loss"] / n
    metrics["aux_loss"] = (moe.aux_loss_coef if moe else 0.0) * router["mean_aux_loss"]
    metrics["router_z_loss"] = (moe.router_z_loss_coef if moe else 0.0) * router[
        "mean_router_z_loss"
    ]
    metrics["accuracy"] = sums["accuracy"] / n
    metrics["num_tokens"] = sums["num_tokens"]
    for name in OBJECTIVE_SUMS:  # extra sums of a custom objective (e.g. distillation)
        if name in sums:
            metrics[name] = sums[name] / n
    metrics["loss"] = (
        metrics.get("objective", metrics["cross_entropy"])
        + metrics["z_loss"]
        + metrics["aux_loss"]
        + metrics["router_z_loss"]
    )
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
