"""Encoder-decoder and decoder-only T5.1.1 stacks interleaving dense and Switch FFN layers.

Legend: B batch, L length (Q new decoder positions / S cached or encoder positions), D d_model,
H heads, V vocab. Batches use seqio feature-converter names (encoder_input_tokens, ...).

Inference: `init_cache` holds, per decoder layer, the self-attention keys/values of every
position decoded so far and the cross-attention keys/values of the encoder output (computed
once); `decode` runs new positions against it. The training path (`__call__`) does not use it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import (
    NO_NOISE,
    Attention,
    Embed,
    Keys,
    Mlp,
    RelativePositionBias,
    RMSNorm,
    attention_mask,
    constrain,
    dropout,
    kernel_param,
)
from switch_jax.models.moe import MoeLayer
from switch_jax.models.routing import RouterStats
from switch_jax.models.streams import STACK_OUTPUT, LayerStream, ModelStream


class StackContext(NamedTuple):
    """What every layer of a stack shares in one call (a pytree: scan bodies close over it)."""

    self_bias_BHQS: jax.Array  # relative positions + packing / padding / causal mask
    token_mask_BQ: jax.Array  # bool: real tokens, the ones that take MoE capacity
    encoded_BSD: jax.Array | None = None  # encoder output (training; decoding caches its K/V)
    cross_bias_BHQS: jax.Array | None = None  # [B, 1, Q, S] encoder packing / padding mask
    index: int | jax.Array | None = None  # decoding: position of the first new token


class Layer(nnx.Module):
    """Pre-norm residual layer: self-attention, [cross-attention], FFN (dense or Switch)."""

    def __init__(self, cfg: ModelConfig, *, sparse: bool, cross: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pre_self_attention_norm = RMSNorm(cfg, rngs=rngs)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.cross_attention = Attention(cfg, rngs=rngs) if cross else None
        self.pre_cross_attention_norm = RMSNorm(cfg, rngs=rngs) if cross else None
        self.pre_mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MoeLayer(cfg, rngs=rngs) if sparse else Mlp(cfg, rngs=rngs)

    def __call__(self, x_BLD, ctx: StackContext, keys: Keys, *, train: bool):
        """(x_BLD, RouterStats or None for a dense layer) over whole sequences."""
        h = self.pre_self_attention_norm(x_BLD)
        h = self.self_attention(h, h, ctx.self_bias_BHQS, keys.fold(LayerStream.SELF_ATTENTION))
        residual_key = keys.fold(LayerStream.SELF_ATTENTION_RESIDUAL).dropout
        x_BLD = x_BLD + dropout(h, self.cfg.dropout_rate, residual_key)
        return self._cross_and_ffn(x_BLD, ctx, keys, train=train)

    def init_cache(self, batch_size: int, length: int, encoded_BSD=None) -> dict:
        """Zero self-attention K/V for `length` positions; cross K/V of `encoded_BSD` now."""
        shape = (batch_size, self.cfg.num_heads, length, self.cfg.head_dim)  # Attention's layout
        cache = {"k": jnp.zeros(shape, self.cfg.dtype), "v": jnp.zeros(shape, self.cfg.dtype)}
        if self.cross_attention is not None:
            cache["cross_k"], cache["cross_v"] = self.cross_attention.project_kv(encoded_BSD)
        return cache

    def decode(self, x_BQD, ctx: StackContext, cache: dict):
        """New positions ctx.index.. : their keys/values go into the cache, then attend."""
        h = self.pre_self_attention_norm(x_BQD)
        axes = ("batch", "heads", "length", "kv")
        new = dict(cache)
        for name, value in zip(("k", "v"), self.self_attention.project_kv(h), strict=True):
            updated = jax.lax.dynamic_update_slice_in_dim(cache[name], value, ctx.index, 2)
            new[name] = constrain(updated, axes)
        h = self.self_attention.attend(h, new["k"], new["v"], ctx.self_bias_BHQS, NO_NOISE)
        cross_kv = (cache["cross_k"], cache["cross_v"]) if "cross_k" in cache else None
        x_BQD, stats = self._cross_and_ffn(x_BQD + h, ctx, NO_NOISE, train=False, cross_kv=cross_kv)
        return x_BQD, new, stats

    def _cross_and_ffn(self, x_BLD, ctx: StackContext, keys: Keys, *, train: bool, cross_kv=None):
        rate = self.cfg.dropout_rate
        if self.cross_attention is not None:
            h = self.pre_cross_attention_norm(x_BLD)
            if cross_kv is None:
                cross_kv = self.cross_attention.project_kv(ctx.encoded_BSD)
            cross_keys = keys.fold(LayerStream.CROSS_ATTENTION)
            h = self.cross_attention.attend(h, *cross_kv, ctx.cross_bias_BHQS, cross_keys)
            residual_key = keys.fold(LayerStream.CROSS_ATTENTION_RESIDUAL).dropout
            x_BLD = x_BLD + dropout(h, rate, residual_key)
        h = self.pre_mlp_norm(x_BLD)
        stats = None
        ffn_keys = keys.fold(LayerStream.FFN)
        if isinstance(self.mlp, MoeLayer):
            h, stats = self.mlp(h, ctx.token_mask_BQ, ffn_keys, train=train)
        else:
            h = self.mlp(h, ffn_keys)
        x_BLD = x_BLD + dropout(h, rate, keys.fold(LayerStream.FFN_RESIDUAL).dropout)
        return constrain(x_BLD, ("batch", "length", "embed")), stats


class Block(nnx.Module):
    """`sparse_every` consecutive layers, the last one sparse: the unit that scan repeats."""

    def __init__(
        self, cfg: ModelConfig, *, first_layer: int, size: int, cross: bool, rngs: nnx.Rngs
    ):
        self.layers = nnx.List(
            [
                Layer(cfg, sparse=cfg.is_sparse(first_layer + i), cross=cross, rngs=rngs)
                for i in range(size)
            ]
        )

    def __call__(self, x_BLD, ctx: StackContext, keys: Keys, *, train: bool):
        """(x_BLD, RouterStats of the block's sparse layers in order); layer i gets keys.fold(i)."""
        all_stats = []
        for i, layer in enumerate(self.layers):
            x_BLD, stats = layer(x_BLD, ctx, keys.fold(i), train=train)
            if stats is not None:
                all_stats.append(stats)
        return x_BLD, all_stats

    def init_cache(self, batch_size: int, length: int, encoded_BSD=None) -> tuple:
        """One cache per layer."""
        return tuple(layer.init_cache(batch_size, length, encoded_BSD) for layer in self.layers)

    def decode(self, x_BQD, ctx: StackContext, cache: tuple):
        """`Layer.decode` through the block's layers: (x_BQD, new cache, sparse-layer stats)."""
        new, all_stats = [], []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x_BQD, layer_cache, stats = layer.decode(x_BQD, ctx, layer_cache)
            new.append(layer_cache)
            if stats is not None:
                all_stats.append(stats)
        return x_BQD, tuple(new), all_stats


class Stack(nnx.Module):
    """Encoder (bidirectional) or decoder (causal) stack with a final RMSNorm."""

    def __init__(
        self, cfg: ModelConfig, *, num_layers: int, causal: bool, cross: bool, rngs: nnx.Rngs
    ):
        if cfg.moe is not None:
            # Each stack's MoE layers see one routing method: the decoder's may differ.
            method = cfg.moe.stack_routing(causal)
            cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, routing=method))
        if causal and cfg.moe is not None and cfg.moe.batch_prioritized_routing:
            # Slots by confidence would let later tokens decide whether an earlier one is
            # dropped: a decoder routes in token order (flaxformer forbids it there too).
            cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, batch_prioritized_routing=False))
        self.cfg, self.causal = cfg, causal
        self.relpos_bias = RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs)
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        # scan needs identical bodies: a block is one period of the dense/sparse pattern.
        every = cfg.moe.sparse_every if (cfg.moe and cfg.moe.sparse_every) else 1
        if cfg.scan_layers:
            self.num_blocks = num_layers // every

            @nnx.split_rngs(splits=self.num_blocks)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(block_rngs):
                return Block(cfg, first_layer=0, size=every, cross=cross, rngs=block_rngs)

            self.blocks = make(rngs)
        else:
            self.num_blocks = 0
            self.blocks = nnx.List(
                [
                    Block(cfg, first_layer=i, size=1, cross=cross, rngs=rngs)
                    for i in range(num_layers)
                ]
            )

    def __call__(
        self, x_BLD, segments_BL, keys: Keys, *, train: bool, encoded=None, encoder_segments_BS=None
    ):
        """(normed and dropped-out x_BLD, stacked RouterStats or None) over whole sequences.

        Args:
          x_BLD: embedded (and dropped-out) tokens.
          segments_BL: packed segment ids, 0 for padding.
          keys: this stack's noise; block i gets keys.fold(i) (a split key under scan).
          train: selects the MoE train capacity factor and router jitter.
          encoded: encoder output to cross-attend to (decoder of an encoder-decoder model).
          encoder_segments_BS: the encoder's segment ids, with `encoded`.
        """
        L = x_BLD.shape[1]
        self_bias_BHLL = self.relpos_bias(L, L) + attention_mask(
            segments_BL, segments_BL, causal=self.causal
        )
        cross_bias = None
        if encoded is not None:
            cross_bias = attention_mask(segments_BL, encoder_segments_BS, causal=False)
        ctx = StackContext(
            self_bias_BHLL, segments_BL > 0, encoded_BSD=encoded, cross_bias_BHQS=cross_bias
        )
        if self.cfg.scan_layers:
            x_BLD, stats = self._scan(x_BLD, ctx, keys, train)
        else:
            stats = []
            for i, block in enumerate(self.blocks):
                x_BLD, block_stats = block(x_BLD, ctx, keys.fold(i), train=train)
                stats.extend(block_stats)
            stats = _stack(stats)
        x_BLD = self.final_norm(x_BLD)
        return dropout(x_BLD, self.cfg.dropout_rate, keys.fold(STACK_OUTPUT).dropout), stats

    def moe_layers(self) -> list[tuple[MoeLayer, jax.Array]]:
        """Each MoE layer with the index (or, under scan, the [blocks] indices) of its rows in
        this stack's RouterStats: what the train step's bias update pairs up."""
        if self.cfg.scan_layers:
            layers = list(self.blocks.layers)
            sparse = [layer.mlp for layer in layers if isinstance(layer.mlp, MoeLayer)]
            blocks = jnp.arange(self.num_blocks) * len(sparse)
            return [(mlp, blocks + k) for k, mlp in enumerate(sparse)]
        sparse = [
            layer.mlp
            for block in self.blocks
            for layer in block.layers
            if isinstance(layer.mlp, MoeLayer)
        ]
        return [(mlp, jnp.asarray(i)) for i, mlp in enumerate(sparse)]

    def _scan(self, x_BLD, ctx: StackContext, keys: Keys, train: bool):
        graphdef, state = nnx.split(self.blocks)
        n = self.num_blocks
        # scan takes per-block keys as a stacked input, hence split (not fold_in(i)): scanned and
        # unscanned models draw different noise from the same keys.
        block_keys = Keys(*(None if k is None else jax.random.split(k, n) for k in keys))

        def body(x, scanned):
            block_state, k = scanned
            block = nnx.merge(graphdef, block_state)
            x, block_stats = block(x, ctx, k, train=train)
            return x, block_stats

        x_BLD, stats = jax.lax.scan(body, x_BLD, (state, block_keys))
        return x_BLD, _scanned_layer_order(stats)

    def init_cache(self, batch_size: int, length: int, encoded_BSD=None):
        """Per block (a tuple over blocks, or one tree with a leading blocks axis under scan)."""
        if not self.cfg.scan_layers:
            return tuple(b.init_cache(batch_size, length, encoded_BSD) for b in self.blocks)
        graphdef, state = nnx.split(self.blocks)
        return jax.vmap(
            lambda block_state: nnx.merge(graphdef, block_state).init_cache(
                batch_size, length, encoded_BSD
            )
        )(state)

    def decode(self, x_BQD, cache, *, index, key_valid_BS, token_mask_BQ, encoder_valid_BS=None):
        """Inference on Q new positions starting at `index` (keys 0..S-1 are cached)."""
        B, Q = token_mask_BQ.shape
        S = key_valid_BS.shape[1]
        # Every new position is a query of one segment; which keys count comes from key_valid_BS.
        queries_BQ = jnp.ones((B, Q), jnp.int32)
        self_bias_BHQS = self.relpos_bias(Q, S, q_offset=index) + attention_mask(
            queries_BQ, key_valid_BS, causal=True, q_offset=index
        )
        cross_bias = None
        if encoder_valid_BS is not None:
            cross_bias = attention_mask(queries_BQ, encoder_valid_BS, causal=False)
        ctx = StackContext(self_bias_BHQS, token_mask_BQ, cross_bias_BHQS=cross_bias, index=index)
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, scanned):
                block_state, block_cache = scanned
                block = nnx.merge(graphdef, block_state)
                x, block_cache, block_stats = block.decode(x, ctx, block_cache)
                return x, (block_cache, block_stats)

            x_BQD, (cache, stats) = jax.lax.scan(body, x_BQD, (state, cache))
            stats = _scanned_layer_order(stats)
        else:
            new, stats = [], []
            for block, block_cache in zip(self.blocks, cache, strict=True):
                x_BQD, block_cache, block_stats = block.decode(x_BQD, ctx, block_cache)
                new.append(block_cache)
                stats.extend(block_stats)
            cache, stats = tuple(new), _stack(stats)
        return self.final_norm(x_BQD), cache, stats


def _scanned_layer_order(stats: list) -> RouterStats | None:
    """scan stacks [blocks] per position inside the block; flatten to layer order."""
    if not stats:
        return None
    stacked = jax.tree.map(lambda *s: jnp.stack(s, 1), *stats)  # [blocks, per block, ...]
    return jax.tree.map(lambda s: s.reshape((-1,) + s.shape[2:]), stacked)


def _stack(stats: list[RouterStats]) -> RouterStats | None:
    if not stats:
        return None
    return jax.tree.map(lambda *s: jnp.stack(s), *stats)


class Transformer(nnx.Module):
    """`model(batch, train=..., keys=...) -> (logits_BLV float32, {stack: RouterStats | None})`.

    Router statistics have a leading axis over that stack's sparse layers, in layer order.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedder = Embed(cfg, rngs=rngs)
        self.encoder = (
            Stack(cfg, num_layers=cfg.num_encoder_layers, causal=False, cross=False, rngs=rngs)
            if cfg.is_encoder_decoder
            else None
        )
        self.decoder = Stack(
            cfg,
            num_layers=cfg.num_decoder_layers,
            causal=True,
            cross=cfg.is_encoder_decoder,
            rngs=rngs,
        )
        self.logits_dense = (
            None
            if cfg.tied_logits
            else kernel_param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        )

    def __call__(self, batch: dict, *, train: bool = False, keys: Keys = NO_NOISE):
        """Teacher-forced forward pass of a seqio-style batch (see the class docstring)."""
        cfg = self.cfg
        stats = {}
        encoded = enc_segments = None
        if self.encoder is not None:
            enc_tokens = batch["encoder_input_tokens"]
            enc_segments = _segments(batch, "encoder", enc_tokens)
            encoded, stats["encoder"] = self.encode(enc_tokens, enc_segments, keys, train=train)
        dec_tokens = batch["decoder_input_tokens"]
        targets = batch.get("decoder_target_tokens")
        if targets is None:  # inference: the BOS = 0 opening every decoder input is real
            targets = jnp.asarray(dec_tokens).at[:, 0].set(1)
        dec_segments = _segments(batch, "decoder", targets)
        embedding_key = keys.fold(ModelStream.DECODER_EMBEDDING).dropout
        y = dropout(self.token_embedder(dec_tokens), cfg.dropout_rate, embedding_key)
        y, stats["decoder"] = self.decoder(
            y,
            dec_segments,
            keys.fold(ModelStream.DECODER),
            train=train,
            encoded=encoded,
            encoder_segments_BS=enc_segments,
        )
        return self._logits(y), stats

    def encode(self, tokens_BS, segments_BS, keys: Keys = NO_NOISE, *, train: bool = False):
        """(encoder output [B, S, D], encoder RouterStats)."""
        embedding_key = keys.fold(ModelStream.ENCODER_EMBEDDING).dropout
        x = dropout(self.token_embedder(tokens_BS), self.cfg.dropout_rate, embedding_key)
        return self.encoder(x, segments_BS, keys.fold(ModelStream.ENCODER), train=train)

    def init_cache(self, batch_size: int, length: int, encoded_BSD=None, encoder_valid_BS=None):
        """Empty decoder cache for `length` positions; cross K/V of `encoded_BSD` filled now."""
        cache = {
            "decoder": self.decoder.init_cache(batch_size, length, encoded_BSD),
            "valid": jnp.zeros((batch_size, length), jnp.int32),
        }
        if encoded_BSD is not None:
            cache["encoder_valid"] = encoder_valid_BS.astype(jnp.int32)
        return cache

    def decode(self, tokens_BQ, cache: dict, *, index, valid_BQ=None, token_mask_BQ=None):
        """(logits_BQV, cache, decoder RouterStats) of decoder inputs at positions index...

        Args:
          tokens_BQ: decoder input tokens (BOS = 0 first) at positions index..index+Q-1.
          cache: from `init_cache`, or the one the previous call returned.
          index: position of the first new token (a traced int is fine).
          valid_BQ: 0 marks padding that later positions must not attend to (left-padded
            prompts); default all real.
          token_mask_BQ: tokens that take MoE capacity (default `valid_BQ`); finished rows pass 0.
        """
        valid_BQ = jnp.ones(tokens_BQ.shape, jnp.int32) if valid_BQ is None else valid_BQ
        valid_BQ = valid_BQ.astype(jnp.int32)
        token_mask_BQ = valid_BQ > 0 if token_mask_BQ is None else token_mask_BQ
        key_valid_BS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BQ, index, 1)
        y, decoder_cache, stats = self.decoder.decode(
            self.token_embedder(tokens_BQ),
            cache["decoder"],
            index=index,
            key_valid_BS=key_valid_BS,
            token_mask_BQ=token_mask_BQ,
            encoder_valid_BS=cache.get("encoder_valid"),
        )
        return self._logits(y), {**cache, "decoder": decoder_cache, "valid": key_valid_BS}, stats

    def _logits(self, y):
        cfg = self.cfg
        if self.logits_dense is None:
            # Tied logits are rescaled so their magnitude does not grow with d_model (T5).
            logits_BLV = self.token_embedder.attend(y * (cfg.d_model**-0.5))
        else:
            logits_BLV = jnp.einsum(
                "bld,dv->blv", y.astype(jnp.float32), self.logits_dense[...].astype(jnp.float32)
            )
        return constrain(logits_BLV, ("batch", "length", "vocab"))


def _segments(batch: dict, prefix: str, tokens_BL: jax.Array) -> jax.Array:
    """Packed segment ids, or 1 for real tokens / 0 for padding when the batch is unpacked."""
    segments = batch.get(f"{prefix}_segment_ids")
    if segments is None:
        return (tokens_BL > 0).astype(jnp.int32)
    return segments.astype(jnp.int32)
