"""Switch / MoE feed-forward layer: group tokens, route, dispatch to stacked experts, combine.

Legend: B batch, L length, D d_model, F d_ff, G groups, T tokens per group, E experts,
C capacity, K experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models import routing
from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import Keys, activate, constrain, dropout, kernel_param, param

JITTER_STREAM = 1  # fold-in constants keep the layer's noise streams independent
EXPERT_DROPOUT_STREAM = 2


class MoeLayer(nnx.Module):
    """Top-k (k=1: Switch) FFN. A token over capacity gets an output of exactly 0 here, so the
    residual connection alone carries it to the next layer (paper §2.2)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.moe is not None
        self.cfg, self.moe = cfg, cfg.moe
        E, D, F = self.moe.num_experts, cfg.d_model, cfg.d_ff
        router_init = nnx.initializers.normal(self.moe.router_init_stddev)
        self.router = param(router_init(rngs.params(), (D, E), jnp.float32), ("embed", "unmodeled"))
        in_axes, out_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.wi = kernel_param(rngs, cfg, (E, D, F), in_axes, batch_axis=(0,))
        self.wi_gate = (
            kernel_param(rngs, cfg, (E, D, F), in_axes, batch_axis=(0,))
            if cfg.activation == "geglu"
            else None
        )
        self.wo = kernel_param(rngs, cfg, (E, F, D), out_axes, batch_axis=(0,))

    def __call__(
        self, x_BLD: jax.Array, token_mask_BL: jax.Array, keys: Keys, *, train: bool
    ) -> tuple[jax.Array, routing.RouterStats]:
        B, L, D = x_BLD.shape
        moe = self.moe
        G = routing.num_groups(B * L, moe.group_size, moe.num_expert_partitions)
        T = B * L // G
        x_GTD = constrain(x_BLD.reshape(G, T, D), ("batch", "length", "embed"))
        mask_GT = token_mask_BL.reshape(G, T)

        jitter_key = None
        if train and keys.jitter is not None:
            jitter_key = jax.random.fold_in(keys.jitter, JITTER_STREAM)
        logits_GTE = routing.router_logits(
            x_GTD,
            self.router[...],
            jitter_eps=moe.jitter_eps,
            jitter_key=jitter_key,
            dtype=moe.router_dtype,
        )
        cf = moe.capacity_factor_train if train else moe.capacity_factor_eval
        capacity = routing.expert_capacity(T, moe.num_experts, cf, moe.min_capacity)
        route, stats = routing.route(
            logits_GTE,
            mask_GT,
            top_k=moe.top_k,
            capacity=capacity,
            batch_prioritized=moe.batch_prioritized_routing,
        )
        dispatch_fn = _einsum_dispatch if moe.dispatch == "einsum" else _scatter_dispatch
        y_GTD = dispatch_fn(x_GTD, route, moe.num_experts, lambda x: self._experts(x, keys))
        return y_GTD.reshape(B, L, D), stats

    def _experts(self, x_GECD: jax.Array, keys: Keys) -> jax.Array:
        """Token-sharded -> expert-sharded (all-to-all), run the experts, and back."""
        dt = self.cfg.dtype
        x_GECD = constrain(x_GECD, ("batch", "unmodeled", "expert_capacity", "embed"))
        x_EGCD = constrain(
            jnp.swapaxes(x_GECD, 0, 1), ("expert", "expert_group", "expert_capacity", "embed")
        )
        h_EGCF = jnp.einsum("egcd,edf->egcf", x_EGCD, self.wi[...].astype(dt))
        gate = None
        if self.wi_gate is not None:
            gate = jnp.einsum("egcd,edf->egcf", x_EGCD, self.wi_gate[...].astype(dt))
        h_EGCF = activate(self.cfg, h_EGCF, gate)
        h_EGCF = constrain(h_EGCF, ("expert", "expert_group", "expert_capacity", "mlp"))
        key = (
            None
            if keys.dropout is None
            else jax.random.fold_in(keys.dropout, EXPERT_DROPOUT_STREAM)
        )
        h_EGCF = dropout(h_EGCF, self.moe.expert_dropout_rate, key)
        y_EGCD = jnp.einsum("egcf,efd->egcd", h_EGCF, self.wo[...].astype(dt))
        y_EGCD = constrain(y_EGCD, ("expert", "expert_group", "expert_capacity", "embed"))
        y_GECD = jnp.swapaxes(y_EGCD, 0, 1)
        return constrain(y_GECD, ("batch", "unmodeled", "expert_capacity", "embed"))


def _einsum_dispatch(x_GTD, route: routing.Routing, num_experts: int, experts):
    """GShard one-hot dispatch/combine: cost O(G*T*E*C*D), paper-exact, TPU-friendly."""
    dt = x_GTD.dtype
    C = route.capacity
    onehot_GTKE = jax.nn.one_hot(route.expert_GTK, num_experts, dtype=jnp.float32)
    onehot_GTKC = jax.nn.one_hot(route.slot_GTK, C, dtype=jnp.float32)
    kept_GTK = route.kept_GTK.astype(jnp.float32)
    dispatch_GTEC = jnp.einsum("gtke,gtkc,gtk->gtec", onehot_GTKE, onehot_GTKC, kept_GTK)
    combine_GTEC = jnp.einsum("gtke,gtkc,gtk->gtec", onehot_GTKE, onehot_GTKC, route.gate_GTK)
    # Cast back to the activation dtype before the all-to-all (selective precision).
    x_GECD = jnp.einsum("gtec,gtd->gecd", dispatch_GTEC.astype(dt), x_GTD)
    y_GECD = experts(x_GECD)
    return jnp.einsum("gtec,gecd->gtd", combine_GTEC.astype(dt), y_GECD)


def _scatter_dispatch(x_GTD, route: routing.Routing, num_experts: int, experts):
    """Index gather/scatter: cost O(G*T*D) plus the experts, linear in tokens."""
    G, T, D = x_GTD.shape
    C = route.capacity
    K = route.expert_GTK.shape[-1]
    slots = num_experts * C
    flat_GTK = route.expert_GTK * C + route.slot_GTK
    # Which token fills each slot (T = empty); dropped assignments write out of bounds.
    target_GTK = jnp.where(route.kept_GTK, flat_GTK, slots)
    token_GTK = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (G, T, K))
    source_GS = jnp.full((G, slots), T, jnp.int32)
    source_GS = jax.vmap(lambda s, i, t: s.at[i.ravel()].set(t.ravel(), mode="drop"))(
        source_GS, target_GTK, token_GTK
    )
    padded_GTD = jnp.concatenate([x_GTD, jnp.zeros((G, 1, D), x_GTD.dtype)], axis=1)
    x_GSD = jnp.take_along_axis(padded_GTD, source_GS[..., None], axis=1)
    y_GSD = experts(x_GSD.reshape(G, num_experts, C, D)).reshape(G, slots, D)
    safe_GTK = jnp.where(route.kept_GTK, flat_GTK, 0)
    y_GTKD = jnp.take_along_axis(y_GSD, safe_GTK.reshape(G, T * K)[..., None], axis=1)
    y_GTKD = y_GTKD.reshape(G, T, K, D)
    gate_GTK = route.gate_GTK.astype(x_GTD.dtype)
    return jnp.einsum("gtkd,gtk->gtd", y_GTKD, gate_GTK)
