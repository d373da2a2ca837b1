"""T5.1.1 building blocks: RMSNorm, embeddings, dense MLP, relative-position attention.

Legend: B batch, L length (Q queries / S keys), D d_model, F d_ff, H heads, K head dim, V vocab.
Parameters name logical axes only; parallel/partitioning.py maps them to mesh axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from jax.extend.random import threefry2x32_p

from switch_jax.models.config import ModelConfig

# Finite, so a query whose keys are all masked (a padding position) gets a uniform softmax
# instead of NaN: its output is ignored, but a NaN would survive the loss weights (0 * NaN).
NEG_INF = -1e9


class Keys(NamedTuple):
    """Per-call randomness: None means that kind of noise is off (evaluation).

    A NamedTuple, so it passes through jit and scan as a pytree (scan splits each key).
    """

    dropout: jax.Array | None = None
    jitter: jax.Array | None = None

    def fold(self, stream: int) -> Keys:
        """Both keys folded with `stream` (a value of models/streams.py, or a layer index)."""
        return Keys(*(None if k is None else jax.random.fold_in(k, stream) for k in self))


NO_NOISE = Keys()


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op unless partitioning installed rules."""
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        return x
    mesh_axes = core_spmd.from_sharding_rules(logical_axes, rules)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*mesh_axes))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with a mask per element; the identity without a key (evaluation)."""
    if rate <= 0 or key is None:
        return x
    return drop_with_mask(x, dropout_mask(key, rate, x.shape), rate)


# Dropout compares 16-bit uniforms with a threshold: the keep probability is a multiple of
# 2^-16 (0.1 -> 0.1000061), and drop_with_mask scales by that probability, so the expectation
# stays exact. 16 bits, four per threefry hash, instead of jax.random.bernoulli's one hash per
# element: the draws were ~20 % of a CPU train step with dropout 0.1 (docs/benchmarks.md §8).
_DROPOUT_BITS = 16


def _threshold(rate: float) -> int:
    """The 16-bit values below which `dropout_mask` drops an element."""
    return round(rate * 2**_DROPOUT_BITS)


def keep_probability(rate: float) -> float:
    """The probability that `dropout_mask` keeps an element at `rate`."""
    return 1.0 - _threshold(rate) / 2**_DROPOUT_BITS


def dropout_mask(key: jax.Array, rate: float, shape) -> jax.Array:
    """The elements `dropout` keeps for `key` (True: kept): the same draw for the same shape,
    on any mesh (each element's bits depend on its index only)."""
    return _uniform16(key, tuple(shape)) >= jnp.uint16(_threshold(rate))


def _uniform16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint16 uniforms of `shape`: the two 32-bit words of each threefry hash of (row, column)
    counters, split in halves, fill four neighbours along the last axis. Other key
    implementations (rbg) fill two per 32-bit draw of jax.random.bits."""
    *lead, last = shape or (1,)
    rows = math.prod(lead)
    threefry_words = _threefry_key_words(key) if rows < 2**32 else None
    per_hash = 4 if threefry_words is not None else 2
    # One hash (or 32-bit draw) per word of the 3-D view [first leading axis, the other leading
    # axes, words], with the counters of `shape` (so the same bits). XLA:CPU compiled the loop
    # over a 4-D attention or expert mask in ~1.0 s CPU, over this view in ~0.5 s. Each of its
    # axes stays shardable: the batch or experts, the heads or groups (the major part of the
    # merged axis), and d_ff, which a 2-D view (~0.25 s) would not all keep.
    view = (lead[0] if lead else 1, math.prod(lead[1:]), -(-last // per_hash))
    if threefry_words is not None:
        w1, w2 = threefry2x32_p.bind(*threefry_words, *_row_column_counters(view))
        words = jnp.stack([w1, w2], axis=-1)
    else:
        words = jax.random.bits(key, view, jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)
    return halves.reshape(*view[:2], -1)[..., :last].reshape(shape)


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The two uint32 words of a threefry key (typed, or a raw uint32[2]); None for others."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return tuple(key) if key.shape == (2,) else None
    if "threefry" not in str(jax.random.key_impl(key)):
        return None
    k1, k2 = jax.random.key_data(key)
    return k1, k2


def _row_column_counters(shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """uint32 counters of each element of [a, b, w]: its row (index over [a, b]) and column."""
    iota = lambda axis: jax.lax.broadcasted_iota(jnp.uint32, shape, axis)  # noqa: E731
    return iota(0) * jnp.uint32(shape[1]) + iota(1), iota(2)


def drop_with_mask(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout with a given mask (`dropout_mask`'s, or rows of it)."""
    return jnp.where(keep, x / keep_probability(rate), 0).astype(x.dtype)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter annotated with logical axes; placement happens later, under jit."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def kernel_param(
    rngs: nnx.Rngs,
    cfg: ModelConfig,
    shape,
    axes,
    *,
    in_axis=-2,
    out_axis=-1,
    batch_axis=(),
    divide_by: float = 1.0,
) -> nnx.Param:
    """Truncated normal, sigma = sqrt(init_scale / fan_in) (paper §2.4, footnote 6)."""
    init = nnx.initializers.variance_scaling(
        cfg.init_scale,
        "fan_in",
        "truncated_normal",
        in_axis=in_axis,
        out_axis=out_axis,
        batch_axis=batch_axis,
    )
    value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)) / divide_by
    return param(value, axes)


class RMSNorm(nnx.Module):
    """T5's LayerNorm: scale only (no mean subtraction, no bias), statistics in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = param(jnp.ones((cfg.d_model,), cfg.param_dtype), ("embed",))
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x / rms(x) * scale over the last axis, returned in the activation dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [V, D], shared by both stacks and, with tied logits, the output layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.embedding_init_stddev)
        self.embedding = param(
            init(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype)),
            ("vocab", "embed"),
        )
        self.dtype = cfg.dtype

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        """Embeddings of `tokens_BL` in the activation dtype (no sqrt(D) scale, as T5)."""
        x_BLD = jnp.take(self.embedding[...], tokens_BL, axis=0).astype(self.dtype)
        return constrain(x_BLD, ("batch", "length", "embed"))

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Tied output logits in float32."""
        return jnp.einsum(
            "bld,vd->blv", x_BLD.astype(jnp.float32), self.embedding[...].astype(jnp.float32)
        )


def activate(cfg: ModelConfig, h: jax.Array, gate: jax.Array | None) -> jax.Array:
    """The FFN nonlinearity of `cfg.activation`; `gate` (x W0) is used by GEGLU only."""
    if cfg.activation == "relu":
        return jax.nn.relu(h)
    if cfg.activation == "gelu":
        return jax.nn.gelu(h, approximate=True)
    return jax.nn.gelu(gate, approximate=True) * h  # GEGLU: gelu(x W0) * (x W1)


class Mlp(nnx.Module):
    """Dense FFN: wi -> activation -> dropout -> wo, no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        shape, axes = (cfg.d_model, cfg.d_ff), ("embed", "mlp")
        self.wi = kernel_param(rngs, cfg, shape, axes)
        self.wi_gate = kernel_param(rngs, cfg, shape, axes) if cfg.activation == "geglu" else None
        self.wo = kernel_param(rngs, cfg, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))

    def __call__(self, x_BLD: jax.Array, keys: Keys) -> jax.Array:
        """FFN output [B, L, D]; `keys.dropout` drops hidden units (None: no dropout)."""
        dt = self.cfg.dtype
        h_BLF = jnp.einsum("bld,df->blf", x_BLD, self.wi[...].astype(dt))
        gate = None
        if self.wi_gate is not None:
            gate = jnp.einsum("bld,df->blf", x_BLD, self.wi_gate[...].astype(dt))
        h_BLF = activate(self.cfg, h_BLF, gate)
        h_BLF = constrain(h_BLF, ("batch", "length", "mlp"))
        h_BLF = dropout(h_BLF, self.cfg.dropout_rate, keys.dropout)
        return jnp.einsum("blf,fd->bld", h_BLF, self.wo[...].astype(dt))


def relative_position_bucket(
    relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int
):
    """T5 bucketing: exact buckets for small distances, log-spaced up to max_distance."""
    distance = -relative_position
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance < 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    # log(0) would be -inf; those distances take the exact branch below anyway.
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    log_ratio = jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nnx.Module):
    """One learned [H, buckets] table per stack, shared by all its self-attention layers."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(cfg.relative_bias_init_scale, "fan_avg", "uniform")
        self.rel_embedding = param(
            init(rngs.params(), (cfg.num_heads, cfg.relative_buckets), cfg.param_dtype),
            ("heads", "relpos_buckets"),
        )
        self.cfg = cfg
        self.bidirectional = bidirectional

    def __call__(self, q_len: int, k_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
        """[1, H, Q, S] bias; queries sit at positions q_offset.. (a decoding step), keys at 0..."""
        relative_QS = jnp.arange(k_len)[None, :] - (jnp.arange(q_len) + q_offset)[:, None]
        bucket_QS = relative_position_bucket(
            relative_QS,
            bidirectional=self.bidirectional,
            num_buckets=self.cfg.relative_buckets,
            max_distance=self.cfg.relative_max_distance,
        )
        bias_HQS = jnp.take(self.rel_embedding[...], bucket_QS, axis=1)
        return bias_HQS[None].astype(jnp.float32)  # [1, H, Q, S]


class Attention(nnx.Module):
    """Multi-head attention without the 1/sqrt(K) logit scale (folded into the query init)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
        in_axes = ("embed", "heads", "kv")
        self.query = kernel_param(
            rngs, cfg, (D, H, K), in_axes, in_axis=0, out_axis=(1, 2), divide_by=math.sqrt(K)
        )
        self.key = kernel_param(rngs, cfg, (D, H, K), in_axes, in_axis=0, out_axis=(1, 2))
        self.value = kernel_param(rngs, cfg, (D, H, K), in_axes, in_axis=0, out_axis=(1, 2))
        self.out = kernel_param(
            rngs, cfg, (H, K, D), ("heads", "kv", "embed"), in_axis=(0, 1), out_axis=2
        )

    def __call__(self, x_BQD, memory_BSD, bias_BHQS, keys: Keys) -> jax.Array:
        """Queries `x_BQD` attend to `memory_BSD` (itself for self-attention); [B, Q, D]."""
        return self.attend(x_BQD, *self.project_kv(memory_BSD), bias_BHQS, keys)

    def project_kv(self, memory_BSD) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `memory`: what a decoding cache stores, computed once per token.
        Heads before positions, the layout the attention matmuls batch over: a cache in any
        other layout is transposed (copied) by XLA:CPU at every decoding step."""
        dt = self.cfg.dtype
        k_BHSK = jnp.einsum("bsd,dhk->bhsk", memory_BSD, self.key[...].astype(dt))
        v_BHSK = jnp.einsum("bsd,dhk->bhsk", memory_BSD, self.value[...].astype(dt))
        return k_BHSK, v_BHSK

    def attend(self, x_BQD, k_BHSK, v_BHSK, bias_BHQS, keys: Keys) -> jax.Array:
        """Attention over already projected keys/values (a decoding cache, or `project_kv`).

        `bias_BHQS` is additive (relative positions plus masks; B or H may be 1); dropout, if
        `keys.dropout`, drops attention probabilities as T5 does.
        """
        dt = self.cfg.dtype
        q_BQHK = jnp.einsum("bqd,dhk->bqhk", x_BQD, self.query[...].astype(dt))
        q_BQHK = constrain(q_BQHK, ("batch", "length", "heads", "kv"))
        # Softmax in float32: bfloat16 logits lose the small differences attention relies on.
        logits_BHQS = jnp.einsum("bqhk,bhsk->bhqs", q_BQHK, k_BHSK).astype(jnp.float32)
        probs_BHQS = jax.nn.softmax(logits_BHQS + bias_BHQS, axis=-1).astype(dt)
        probs_BHQS = dropout(probs_BHQS, self.cfg.dropout_rate, keys.dropout)
        ctx_BQHK = jnp.einsum("bhqs,bhsk->bqhk", probs_BHQS, v_BHSK)
        return jnp.einsum("bqhk,hkd->bqd", ctx_BQHK, self.out[...].astype(dt))


def attention_mask(
    q_segments_BQ, k_segments_BS, *, causal: bool, q_offset: int | jax.Array = 0
) -> jax.Array:
    """Additive [B, 1, Q, S] mask: same packed segment, not padding, and causal if asked.

    `q_offset` is the position of the first query (decoding over a cache of keys 0..S-1).
    """
    ok = (q_segments_BQ[:, :, None] == k_segments_BS[:, None, :]) & (k_segments_BS[:, None, :] > 0)
    if causal:
        q_len, k_len = q_segments_BQ.shape[1], k_segments_BS.shape[1]
        q_positions = jnp.arange(q_len) + q_offset
        ok = ok & (jnp.arange(k_len)[None, :] <= q_positions[:, None])[None]
    return jnp.where(ok, 0.0, NEG_INF)[:, None].astype(jnp.float32)
