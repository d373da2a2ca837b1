"""Switch / MoE feed-forward layer: group tokens, route, dispatch to stacked experts, combine.

Legend: B batch, L length, D d_model, F d_ff, G groups, T tokens per group, E experts,
C capacity, P experts per token (the top-k picks), A = T*P assignments, Z = E*C slots,
R sorted rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models import grouped, routing, segment_ffn
from switch_jax.models.config import ModelConfig
from switch_jax.models.expert_choice import route_expert_choice
from switch_jax.models.layers import (
    Keys,
    activate,
    constrain,
    drop_with_mask,
    dropout,
    dropout_mask,
    kernel_param,
    param,
)
from switch_jax.models.streams import MoeStream

# What 'auto' means per platform: a capacity dispatch everywhere (so the trained function does
# not depend on the platform; 'dropless' is a different model), the fastest one measured
# (docs/benchmarks.md). GPU is unmeasured: it takes the grouped-matmul path it was built for.
# On CPU 'sorted' runs the fused FFN over the kept rows: the faster bfloat16 and float32 train
# step, under glibc's malloc and TCMalloc alike (docs/benchmarks.md §11).
AUTO_DISPATCH = {"tpu": "einsum", "gpu": "sorted", "cpu": "sorted"}


def resolve_dispatch(dispatch: str, platform: str) -> str:
    """The concrete dispatch `dispatch` ('auto' or a name) means on `platform`."""
    if dispatch != "auto":
        return dispatch
    return AUTO_DISPATCH.get(platform, "scatter")


def resolve_grouped_matmul(grouped_matmul: str, platform: str) -> str:
    """'ragged_dot' on GPU/TPU; on CPU (where XLA lowers ragged_dot ~7x slower than dense
    matmuls) the fused expert FFN over the kept rows."""
    if grouped_matmul != "auto":
        return grouped_matmul
    return "fused" if platform == "cpu" else "ragged_dot"


class RouterBias(nnx.Param):
    """Loss-free balancing's per-expert choice bias [E]. A Param subclass so that it travels
    with the parameters (checkpoints, shardings over 'expert', restores, decoding), but no
    gradient reaches it (stop_gradient) and the optimizer leaves it alone (optimizer.py): only
    the train step's sign update moves it (training/steps.py)."""


class TokenRouting(NamedTuple):
    """What `sow_routing` records per MoE layer call: P picks per token (top_k, or E for
    expert choice, pick e = expert e)."""

    expert_BLP: jax.Array  # int32 expert of each pick
    kept_BLP: jax.Array  # bool: the pick was processed (not dropped, not padding)
    gate_BLP: jax.Array  # float32 combine weight (0 where not kept)


class MoeLayer(nnx.Module):
    """Top-k (k=1: Switch) FFN. A token over capacity gets an output of exactly 0 here, so the
    residual connection alone carries it to the next layer (paper §2.2).

    With `MoeConfig.sow_routing`, every call sows a `TokenRouting` into the layer's
    `nnx.Intermediate` 'routing' (a tuple, one entry per call); the outputs do not change.
    Capture it from a forward pass of an unscanned model (the model itself keeps nothing):

        model = Transformer(cfg.replace(moe=replace(cfg.moe, sow_routing=True)), rngs=...)
        (logits, stats), sown = nnx.capture(model, nnx.Intermediate)(batch)
        # sown: State .../mlp/routing -> (TokenRouting,)
        route = sown["encoder"]["blocks"][1]["layers"][0]["mlp"]["routing"][0]
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.moe is not None
        self.cfg, self.moe = cfg, cfg.moe
        E, D, F = self.moe.num_experts, cfg.d_model, cfg.d_ff
        router_init = nnx.initializers.normal(self.moe.router_init_stddev)
        self.router = param(router_init(rngs.params(), (D, E), jnp.float32), ("embed", "unmodeled"))
        self.router_bias = (
            RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=("expert",), eager_sharding=False)
            if self.moe.loss_free
            else None
        )
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
        """(y_BLD, this layer's RouterStats).

        Args:
          x_BLD: normed layer input.
          token_mask_BL: real tokens; padding takes no capacity and gets an output of 0.
          keys: the FFN's keys: jitter (router input, train only) and expert dropout.
          train: train capacity factor and jitter; else the eval capacity factor.
        """
        B, L, D = x_BLD.shape
        moe = self.moe
        # Partitioner.adapt_model_config resolves 'auto' for the mesh's devices (AOT for TPU on
        # a CPU host); a bare layer resolves it for the default backend.
        dispatch = resolve_dispatch(moe.dispatch, jax.default_backend())
        # Tokens route in groups of at most group_size: capacity grows with the group, so bounded
        # groups keep the [G, T, E, C] dispatch linear in the batch.
        G = routing.num_groups(B * L, moe.group_size, moe.num_expert_partitions)
        T = B * L // G
        x_GTD = constrain(x_BLD.reshape(G, T, D), ("batch", "length", "embed"))
        mask_GT = token_mask_BL.reshape(G, T)

        noise = self._noise_keys(keys, train=train)
        logits_GTE = routing.router_logits(
            x_GTD,
            self.router[...],
            jitter_eps=moe.jitter_eps,
            jitter_key=noise.jitter,
            dtype=moe.router_dtype,
        )
        cf = moe.capacity_factor_train if train else moe.capacity_factor_eval
        capacity = None
        if dispatch != "dropless":
            capacity = routing.expert_capacity(T, moe.num_experts, cf, moe.min_capacity)
        route, stats = self._route(logits_GTE, mask_GT, capacity, keys, train=train)
        if moe.sow_routing:
            picks = lambda a: a.reshape(B, L, -1)  # noqa: E731
            sown = TokenRouting(*(picks(a) for a in route[:1] + route[2:4]))
            self.sow(nnx.Intermediate, "routing", sown)
        experts = lambda x: self._experts(x, noise.dropout)  # noqa: E731
        if dispatch in ("einsum", "scatter"):
            dispatch_fn = _einsum_dispatch if dispatch == "einsum" else _scatter_dispatch
            y_GTD = dispatch_fn(x_GTD, route, moe.num_experts, experts)
            return y_GTD.reshape(B, L, D), stats
        impl = resolve_grouped_matmul(moe.grouped_matmul, jax.default_backend())
        r = route
        if dispatch == "sorted" and (impl == "blocked" or grouped.expert_shards() > 1):
            # Capacity-bounded segments: dense matmuls, and the all-to-all of [E, G, C, D].
            y_GTD = grouped.capacity_rows(
                x_GTD, r.expert_GTP, r.kept_GTP, r.gate_GTP, capacity, moe.num_experts, experts
            )
        else:
            weights = (self.wi[...], None if self.wi_gate is None else self.wi_gate[...])
            weights += (self.wo[...],)
            drop, slot_GTP = noise.dropout, None
            if dispatch == "sorted" and drop is not None:
                # The mask einsum and scatter draw over their slots, read at each row's slot:
                # every capacity dispatch then computes one function, noise included.
                shape = (moe.num_experts, G, capacity, self.cfg.d_ff)
                keep_EGCF = dropout_mask(drop, moe.expert_dropout_rate, shape)
                axes = ("expert", "expert_group", "expert_capacity", "mlp")
                drop, slot_GTP = constrain(keep_EGCF, axes), r.slot_GTP
            y_GTD = grouped.row_dispatch(
                x_GTD,
                r.expert_GTP,
                r.kept_GTP,
                r.gate_GTP,
                weights,
                drop,
                functools.partial(self._rows_ffn, impl=impl),
                slot_GTP,
            )
        return y_GTD.reshape(B, L, D), stats

    def _route(self, logits_GTE, mask_GT, capacity, keys: Keys, *, train: bool):
        moe = self.moe
        if moe.routing == "expert_choice":
            return route_expert_choice(logits_GTE, mask_GT, capacity=capacity)
        second = None
        if moe.routing == "mesh_tf_top2":
            policy = moe.second_expert_policy_train if train else moe.second_expert_policy_eval
            uniform_GT = None
            if policy == "random":
                # Mesh TF samples in eval too; without a noise key (eval, decoding) the draws
                # come from a fixed key, so evaluation is repeatable.
                key = keys.jitter if train and keys.jitter is not None else jax.random.PRNGKey(0)
                key = jax.random.fold_in(key, MoeStream.SECOND_EXPERT)
                uniform_GT = jax.random.uniform(key, mask_GT.shape, jnp.float32)
            second = routing.SecondExpert(policy, moe.second_expert_threshold, uniform_GT)
        return routing.route(
            logits_GTE,
            mask_GT,
            top_k=moe.top_k,
            capacity=capacity,
            batch_prioritized=moe.batch_prioritized_routing,
            bias_E=None if self.router_bias is None else self.router_bias[...],
            second=second,
        )

    def _noise_keys(self, keys: Keys, *, train: bool) -> Keys:
        """This layer's own keys, None where that noise is off: expert dropout (the FFN's
        dropout key folded with EXPERT_DROPOUT) and router jitter (train only)."""
        dropout = keys.dropout if self.moe.expert_dropout_rate > 0 else None
        jitter = keys.jitter if train else None
        fold = lambda k, s: None if k is None else jax.random.fold_in(k, s)  # noqa: E731
        return Keys(fold(dropout, MoeStream.EXPERT_DROPOUT), fold(jitter, MoeStream.JITTER))

    def _rows_ffn(self, x_RD, sizes_E, weights, noise, *, impl: str):
        """The experts on rows sorted by expert (segment sizes_E): grouped matmuls. `noise`:
        None, a dropout key (a mask drawn over the rows) or the rows' [R, F] mask."""
        dt, rate = self.cfg.dtype, self.moe.expert_dropout_rate
        wi, wi_gate, wo = (None if w is None else w.astype(dt) for w in weights)
        R, F = x_RD.shape[0], wi.shape[-1]
        keep_RF = noise
        if noise is not None and not jnp.issubdtype(noise.dtype, jnp.bool_):
            keep_RF = dropout_mask(noise, rate, (R, F))  # `dropout`'s draw over the rows
        if impl == "fused":
            post = functools.partial(_activate_and_drop, self.cfg, rate)
            block = self.moe.fused_block_size
            return segment_ffn.segment_ffn(x_RD, sizes_E, wi, wi_gate, wo, keep_RF, post, block)
        block = self.moe.dropless_block_size
        h_RF = grouped.grouped_matmul(x_RD, wi, sizes_E, impl, block)
        gate = None
        if wi_gate is not None:
            gate = grouped.grouped_matmul(x_RD, wi_gate, sizes_E, impl, block)
        h_RF = _activate_and_drop(self.cfg, rate, h_RF, gate, keep_RF)
        return grouped.grouped_matmul(h_RF, wo, sizes_E, impl, block)

    def _experts(self, x_GECD: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
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
        h_EGCF = dropout(h_EGCF, self.moe.expert_dropout_rate, dropout_key)
        y_EGCD = jnp.einsum("egcf,efd->egcd", h_EGCF, self.wo[...].astype(dt))
        y_EGCD = constrain(y_EGCD, ("expert", "expert_group", "expert_capacity", "embed"))
        y_GECD = jnp.swapaxes(y_EGCD, 0, 1)
        return constrain(y_GECD, ("batch", "unmodeled", "expert_capacity", "embed"))


def _activate_and_drop(cfg: ModelConfig, rate: float, h, gate, keep):
    """The expert FFN between its matmuls (all rows, or one block of the fused FFN):
    `activate`, then dropout with a given mask."""
    h = activate(cfg, h, gate)
    return h if keep is None else drop_with_mask(h, keep, rate)


def _einsum_dispatch(x_GTD, route: routing.Routing, num_experts: int, experts):
    """GShard one-hot dispatch/combine: cost O(G*T*E*C*D), paper-exact, TPU-friendly."""
    dt = x_GTD.dtype
    C = route.capacity
    onehot_GTPE = jax.nn.one_hot(route.expert_GTP, num_experts, dtype=jnp.float32)
    onehot_GTPC = jax.nn.one_hot(route.slot_GTP, C, dtype=jnp.float32)
    kept_GTP = route.kept_GTP.astype(jnp.float32)
    dispatch_GTEC = jnp.einsum("gtpe,gtpc,gtp->gtec", onehot_GTPE, onehot_GTPC, kept_GTP)
    combine_GTEC = jnp.einsum("gtpe,gtpc,gtp->gtec", onehot_GTPE, onehot_GTPC, route.gate_GTP)
    # Cast back to the activation dtype before the all-to-all (selective precision).
    x_GECD = jnp.einsum("gtec,gtd->gecd", dispatch_GTEC.astype(dt), x_GTD)
    y_GECD = experts(x_GECD)
    return jnp.einsum("gtec,gecd->gtd", combine_GTEC.astype(dt), y_GECD)


def _scatter_dispatch(x_GTD, route: routing.Routing, num_experts: int, experts):
    """Index gather/scatter: cost O(G*T*D) plus the experts, linear in tokens. Rows move by
    `take_rows` (its backward is the inverse gather, not a serial scatter-add)."""
    G, T, D = x_GTD.shape
    C = route.capacity
    P = route.expert_GTP.shape[-1]
    Z, A = num_experts * C, T * P
    # Slot of each assignment (Z: dropped) and the assignment filling each slot (A: empty).
    dst_GA = jnp.where(route.kept_GTP, route.expert_GTP * C + route.slot_GTP, Z)
    dst_GA = dst_GA.reshape(G, A).astype(jnp.int32)
    assignment_A = jnp.arange(A, dtype=jnp.int32)
    # mode="drop" discards the dropped assignments' out-of-range index Z.
    src_GZ = jax.vmap(lambda d: jnp.full((Z,), A, jnp.int32).at[d].set(assignment_A, mode="drop"))(
        dst_GA
    )
    x_GAD = jnp.repeat(x_GTD, P, axis=1) if P > 1 else x_GTD
    x_GZD = jax.vmap(grouped.take_rows)(x_GAD, src_GZ, dst_GA)
    y_GZD = experts(x_GZD.reshape(G, num_experts, C, D)).reshape(G, Z, D)
    y_GTPD = jax.vmap(grouped.take_rows)(y_GZD, dst_GA, src_GZ).reshape(G, T, P, D)
    gate_GTP = route.gate_GTP.astype(x_GTD.dtype)
    return jnp.einsum("gtpd,gtp->gtd", y_GTPD, gate_GTP)
