"""Decoding a trained model: jit-compiled generate (sampling / beam search) and score functions.

    decoder = make_decoder(run.model_cfg, run.partitioner, DecodeConfig(beam_size=4))
    out = decoder.generate(params, {"encoder_input_tokens": x_BS})    # encoder-decoder
    out = decoder.generate(params, {"decoder_prompt_tokens": p_BP})   # decoder-only
    out["tokens"] [B, L] (best beam; EOS then 0s), out["log_prob"] [B], out["length"] [B];
    beam search adds out["beam_tokens"] [B, N, L], out["beam_scores"], out["beam_log_probs"],
    out["beam_lengths"] [B, N] (best first); sampling with NUM_RETURN_SEQUENCES = N > 1 adds
    out["sample_tokens"], out["sample_log_probs"], out["sample_lengths"] (most likely first).
    log_lik_B = decoder.score(params, feature_batch)   # teacher-forced sum of log p(targets)

Legend: B batch, S encoder length, P prompt length, N beams (or samples per example), L decoded
length, V vocab, X = B * N rows.

The encoder runs once; its cross-attention keys/values and every decoded position's
self-attention keys/values live in the model's cache (Transformer.init_cache / decode).
Decoder-only prompts arrive right-padded without BOS; they are left-aligned (BOS then the
prompt, padding in front, masked) and prefilled in one call, so that every row continues at the
same cache position. T5's attention only sees relative positions, so the padding in front
changes nothing. MoE layers route dropless by default (DecodeConfig.routing): every token goes
to its experts whatever the others do, so a row's prediction and score are those it gets alone,
and the empty rows that pad a last batch change nothing. routing='capacity' is T5X's way: each
call's tokens (the B x N of a step, the B x P of a prefill, the B x S of the encoder) route in
groups with the eval capacity factor (or `capacity_factor`), so a row depends on its neighbours.
Everything runs under one jit on the training mesh: batch over ('data', 'expert'), experts over
'expert'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.config.settings import DecodeConfig
from switch_jax.decode import search
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.size import abstract_model
from switch_jax.models.transformer import Transformer
from switch_jax.parallel.partitioning import Partitioner
from switch_jax.training import losses

__all__ = [
    "DecodeConfig",
    "Decoder",
    "make_decoder",
    "generate",
    "precompile",
    "sequence_log_likelihood",
]


@dataclasses.dataclass(frozen=True)
class Decoder:
    model_cfg: ModelConfig  # as decoded: adapted to the mesh, no dropout
    partitioner: Partitioner
    config: DecodeConfig
    generate: Callable[..., dict]  # (params, batch, rng=None) -> dict of [B, ...] arrays
    score: Callable[[Any, dict], jax.Array]  # (params, feature batch) -> log_lik_B
    generate_jitted: Any
    score_jitted: Any


def decoding_model_config(model_cfg: ModelConfig, cfg: DecodeConfig) -> ModelConfig:
    """No dropout; the decoding routing (dropless, or capacity factor and dispatch) in the MoE
    config. It applies to every MoE layer of decoding and scoring: encoder, prefill, steps."""
    model_cfg = model_cfg.replace(dropout_rate=0.0)
    if model_cfg.moe is None:
        return model_cfg
    moe = dataclasses.replace(model_cfg.moe, expert_dropout_rate=0.0)
    if cfg.routing == "dropless":
        return model_cfg.replace(moe=dataclasses.replace(moe, dispatch="dropless"))
    if cfg.capacity_factor is not None:
        moe = dataclasses.replace(moe, capacity_factor_eval=cfg.capacity_factor)
    if cfg.dispatch is not None:
        moe = dataclasses.replace(moe, dispatch=cfg.dispatch)
    return model_cfg.replace(moe=moe)


def generate(model: Transformer, batch: dict, rng: jax.Array, cfg: DecodeConfig) -> dict:
    """The un-jitted search (see the module docstring); `model` is a merged Transformer."""
    logits_BV, cache, start_index = _prefill(model, batch, cfg.max_decode_length)
    B = logits_BV.shape[0]

    def step(tokens_B, cache, index, alive_B):
        logits_BQV, cache, _ = model.decode(
            tokens_B[:, None], cache, index=index, token_mask_BQ=alive_B[:, None]
        )
        return logits_BQV[:, 0], cache

    gather = cache_gatherer(model.cfg)
    if cfg.beam_size == 1:
        return _samples(step, logits_BV, cache, gather, start_index, rng, cfg)
    N = cfg.beam_size
    beams = search.beam_search(
        step,
        logits_BV,
        gather(cache, jnp.repeat(jnp.arange(B), N)),
        cache_gatherer(model.cfg, within_examples=True),
        start_index=start_index,
        max_length=cfg.max_decode_length,
        beam_size=N,
        alpha=cfg.alpha,
        eos_id=cfg.eos_id,
    )
    return {
        "tokens": beams.tokens_BNL[:, 0],
        "log_prob": beams.log_prob_BN[:, 0],
        "length": beams.length_BN[:, 0],
        "beam_tokens": beams.tokens_BNL,
        "beam_scores": beams.score_BN,
        "beam_log_probs": beams.log_prob_BN,
        "beam_lengths": beams.length_BN,
    }


def _samples(step, logits_BV, cache, gather, start_index, rng, cfg: DecodeConfig) -> dict:
    """Greedy or sampled decoding; NUM_RETURN_SEQUENCES > 1 draws that many per example."""
    N = cfg.num_return_sequences
    B = logits_BV.shape[0]
    if N > 1:  # one prefill, then N rows per example (row b * N + n) that sample apart
        rows_X = jnp.repeat(jnp.arange(B), N)
        logits_BV, cache = logits_BV[rows_X], gather(cache, rows_X)
    out = search.sample(
        step,
        logits_BV,
        cache,
        start_index=start_index,
        max_length=cfg.max_decode_length,
        rng=rng,
        eos_id=cfg.eos_id,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )
    if N == 1:
        return {"tokens": out.tokens_BL, "log_prob": out.log_prob_B, "length": out.length_B}
    log_prob_BN = out.log_prob_B.reshape(B, N)
    order_BN = jnp.argsort(-log_prob_BN, axis=1)  # most likely first, as beams are
    log_prob_BN = jnp.take_along_axis(log_prob_BN, order_BN, 1)
    length_BN = jnp.take_along_axis(out.length_B.reshape(B, N), order_BN, 1)
    tokens_BNL = jnp.take_along_axis(out.tokens_BL.reshape(B, N, -1), order_BN[..., None], 1)
    return {
        "tokens": tokens_BNL[:, 0],
        "log_prob": log_prob_BN[:, 0],
        "length": length_BN[:, 0],
        "sample_tokens": tokens_BNL,
        "sample_log_probs": log_prob_BN,
        "sample_lengths": length_BN,
    }


def _prefill(model: Transformer, batch: dict, max_length: int):
    """(next-token logits_BV, cache, cache position of the first generated token)."""
    if model.cfg.is_encoder_decoder:
        tokens_BS = batch["encoder_input_tokens"]
        valid_BS = (tokens_BS > 0).astype(jnp.int32)
        encoded_BSD, _ = model.encode(tokens_BS, valid_BS)
        B = tokens_BS.shape[0]
        cache = model.init_cache(B, 1 + max_length, encoded_BSD, valid_BS)
        logits_BQV, cache, _ = model.decode(jnp.zeros((B, 1), jnp.int32), cache, index=0)
        return logits_BQV[:, 0], cache, 1
    prompt_BP = batch["decoder_prompt_tokens"]
    B, P = prompt_BP.shape
    tokens_BQ = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), prompt_BP.astype(jnp.int32)], 1)
    valid_BQ = jnp.concatenate([jnp.ones((B, 1), jnp.int32), (prompt_BP > 0).astype(jnp.int32)], 1)
    # Left-align: row b moves right by its padding, so every prompt ends at position P.
    shift_B = P - jnp.sum(prompt_BP > 0, axis=1)
    source_BQ = (jnp.arange(P + 1)[None, :] - shift_B[:, None]) % (P + 1)
    tokens_BQ = jnp.take_along_axis(tokens_BQ, source_BQ, 1)
    valid_BQ = jnp.take_along_axis(valid_BQ, source_BQ, 1)
    cache = model.init_cache(B, P + 1 + max_length)
    logits_BQV, cache, _ = model.decode(tokens_BQ, cache, index=0, valid_BQ=valid_BQ)
    return logits_BQV[:, -1], cache, P + 1


# Cache entries computed from the encoder: every beam of an example holds the same ones.
_PER_EXAMPLE = ("cross_k", "cross_v", "encoder_valid")


def cache_gatherer(
    model_cfg: ModelConfig, *, within_examples: bool = False
) -> Callable[[Any, jax.Array], Any]:
    """gather(cache, rows) -> cache of those batch rows (axis 1 of scanned-layer caches).

    within_examples=True is for reordering beams, where each row is taken from a beam of its
    own example: the entries computed from the encoder (cross-attention keys/values, the
    encoder mask) are then the same before and after, and are left in place rather than
    copied at every step (for 512 encoder tokens they are most of the cache)."""
    layer_axis = 1 if model_cfg.scan_layers else 0
    keep = _PER_EXAMPLE if within_examples else ()

    def gather(cache: dict, rows: jax.Array) -> dict:
        def take(name: str, x, axis: int):
            return x if name in keep else jnp.take(x, rows, axis=axis)

        out = {k: take(k, v, 0) for k, v in cache.items() if k != "decoder"}
        out["decoder"] = jax.tree_util.tree_map_with_path(
            lambda path, x: take(getattr(path[-1], "key", None), x, layer_axis), cache["decoder"]
        )
        return out

    return gather


def sequence_log_likelihood(model: Transformer, batch: dict) -> jax.Array:
    """Sum over weighted target tokens of log p(target), teacher-forced, no noise: [B]."""
    logits_BLV, _ = model(batch, train=False)
    targets_BL = batch["decoder_target_tokens"]
    log_p_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    log_p_BL = jnp.take_along_axis(log_p_BLV, targets_BL[..., None], -1)[..., 0]
    return jnp.sum(log_p_BL * losses.target_weights(batch), axis=1)


def make_decoder(model_cfg: ModelConfig, partitioner: Partitioner, cfg: DecodeConfig) -> Decoder:
    """jit-compiled generate and score on `partitioner`'s mesh (batch over data x expert).

    `model_cfg` is adapted to that mesh already (a Run's model_cfg, or
    Partitioner.adapt_model_config's); `cfg.max_decode_length` must be set (see
    DecodeConfig.for_length).
    """
    if cfg.max_decode_length is None:
        raise ConfigError("MAX_DECODE_LENGTH is not set (DecodeConfig.for_length sets it)")
    if partitioner.adapt_model_config(model_cfg) != model_cfg:  # a check: adapting is build's
        raise ConfigError(
            "the model config is not adapted to the decoding mesh: pass the Run's model_cfg "
            "(or Partitioner.adapt_model_config's)"
        )
    model_cfg = decoding_model_config(model_cfg, cfg)
    # Its own graph: the decoding config (no dropout, eval capacity, dispatch) lives in the
    # modules; the parameters are the training model's.
    graphdef, abstract_params = nnx.split(abstract_model(model_cfg), nnx.Param)
    param_shardings = partitioner.param_shardings(abstract_params)
    rows = partitioner.batch_sharding

    def generate_fn(params, batch, rng):
        return generate(nnx.merge(graphdef, params), batch, rng, cfg)

    def score_fn(params, batch):
        return sequence_log_likelihood(nnx.merge(graphdef, params), batch)

    generate_jitted = jax.jit(
        generate_fn,
        in_shardings=(param_shardings, rows, partitioner.replicated),
        out_shardings=rows,
    )
    score_jitted = jax.jit(score_fn, in_shardings=(param_shardings, rows), out_shardings=rows)

    def generate_call(params, batch: dict, rng=None) -> dict:
        _check_batch(partitioner, batch)
        rng = jax.random.PRNGKey(cfg.seed) if rng is None else rng
        with partitioner.activate():
            return generate_jitted(params, batch, rng)

    def score_call(params, batch: dict) -> jax.Array:
        _check_batch(partitioner, batch)
        with partitioner.activate():
            return score_jitted(params, batch)

    return Decoder(
        model_cfg, partitioner, cfg, generate_call, score_call, generate_jitted, score_jitted
    )


def _check_batch(partitioner: Partitioner, batch: dict) -> None:
    B = next(iter(batch.values())).shape[0]
    if B % partitioner.batch_shards:
        raise ConfigError(
            f"decoding batch {B} must be divisible by data x expert "
            f"({partitioner.batch_shards}); pad it or change BATCH_SIZE"
        )


def precompile(decoder: Decoder, jitted, params, batch: dict, *rest) -> Callable:
    """`jitted` (decoder.generate_jitted or score_jitted) compiled now for these arguments'
    shapes, so that a caller can time compilation apart from decoding; the returned function
    takes arguments of the same shapes and never compiles again."""
    _check_batch(decoder.partitioner, batch)
    with decoder.partitioner.activate():
        executable = jitted.lower(params, batch, *rest).compile()

    def call(params, batch: dict, *rest):
        _check_batch(decoder.partitioner, batch)
        with decoder.partitioner.activate():
            return executable(params, batch, *rest)

    return call
