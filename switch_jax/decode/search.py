"""Search over a cached step function: greedy / temperature / top-k / top-p sampling, beam search.

Legend: B batch, N beams, L decoded length, V vocab.

Both searches drive `step_fn(tokens_B, cache, index, alive_B) -> (logits_BV, cache)`, which feeds
one token per row at position `index` and returns the next-token logits; `alive_B` is False for
rows that need no more tokens (under capacity routing they then take no MoE capacity). They start
from the logits of the last prompt position (`logits_BV`, what a prefill returned) and write
tokens at positions `start_index`, `start_index + 1`, ... of the cache. Outputs hold EOS where a
sequence ended and 0 after it. Everything here is jit-able and free of model code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that -inf - -inf never makes a NaN in the score arithmetic

StepFn = Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Samples(NamedTuple):
    tokens_BL: jax.Array  # int32
    log_prob_B: jax.Array  # float32 sum of log p(token) under the model (temperature 1)
    length_B: jax.Array  # int32 tokens up to and including EOS


class Beams(NamedTuple):
    tokens_BNL: jax.Array  # int32, best beam first
    score_BN: jax.Array  # log p / brevity_penalty(length), descending
    log_prob_BN: jax.Array  # float32 sum of log p(token)
    length_BN: jax.Array  # int32


def brevity_penalty(alpha: float, length) -> jax.Array:
    """T5X's length normalisation ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 at alpha 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def filter_logits(logits_BV, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits outside the k most likely tokens, or outside the smallest set holding mass top_p,
    set to NEG_INF (the most likely token always stays)."""
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass of the tokens before it is below top_p.
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, NEG_INF, logits_BV)
    return logits_BV


def choose(logits_BV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """argmax at temperature 0, else a draw from softmax(filtered logits / temperature)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = filter_logits(logits_BV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)


def sample(
    step_fn: StepFn,
    logits_BV: jax.Array,
    cache: Any,
    *,
    start_index,
    max_length: int,
    rng: jax.Array,
    eos_id: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Samples:
    """Up to `max_length` tokens per row; stops early once every row has emitted EOS."""
    B = logits_BV.shape[0]

    def body(carry):
        i, tokens_BL, logits_BV, cache, done_B, log_prob_B, length_B, rng = carry
        rng, key = jax.random.split(rng)
        token_B = choose(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        token_B = jnp.where(done_B, 0, token_B)
        log_p_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], -1)[:, 0]
        log_prob_B = log_prob_B + jnp.where(done_B, 0.0, log_p_B)
        length_B = length_B + (~done_B).astype(jnp.int32)
        tokens_BL = jax.lax.dynamic_update_slice_in_dim(tokens_BL, token_B[:, None], i, 1)
        done_B = done_B | (token_B == eos_id)
        logits_BV, cache = step_fn(token_B, cache, start_index + i, ~done_B)
        return i + 1, tokens_BL, logits_BV, cache, done_B, log_prob_B, length_B, rng

    def cond(carry):
        i, done_B = carry[0], carry[4]
        return (i < max_length) & ~jnp.all(done_B)

    init = (
        jnp.zeros([], jnp.int32),
        jnp.zeros((B, max_length), jnp.int32),
        logits_BV.astype(jnp.float32),
        cache,
        jnp.zeros((B,), bool),
        jnp.zeros((B,), jnp.float32),
        jnp.zeros((B,), jnp.int32),
        rng,
    )
    _, tokens_BL, _, _, _, log_prob_B, length_B, _ = jax.lax.while_loop(cond, body, init)
    return Samples(tokens_BL, log_prob_B, length_B)


class _BeamState(NamedTuple):
    i: jax.Array
    alive_BNL: jax.Array
    alive_log_prob_BN: jax.Array
    finished_BNL: jax.Array
    finished_score_BN: jax.Array
    finished_log_prob_BN: jax.Array
    finished_length_BN: jax.Array
    logits_XV: jax.Array  # X = B * N, row b * N + n
    cache: Any


def _top(values_BM, n: int, *arrays):
    """The n largest values of each row (descending) and the same entries of `arrays` [B, M...]."""
    top_BN, index_BN = jax.lax.top_k(values_BM, n)
    return top_BN, [
        jnp.take_along_axis(a, index_BN.reshape(index_BN.shape + (1,) * (a.ndim - 2)), 1)
        for a in arrays
    ]


def beam_search(
    step_fn: StepFn,
    logits_BV: jax.Array,
    cache_X: Any,
    gather_cache: Callable[[Any, jax.Array], Any],
    *,
    start_index,
    max_length: int,
    beam_size: int,
    alpha: float = 0.6,
    eos_id: int = 1,
) -> Beams:
    """Beam search with T5X's brevity penalty; the `beam_size` best finished sequences per row.

    Args:
      step_fn: see the module docstring; called on B * N rows.
      logits_BV: next-token logits after the prompt, one row per example.
      cache_X: the cache already repeated to B * N rows (row b * N + n belongs to example b).
      gather_cache: `gather_cache(cache, rows_X)` picks cache rows (reorders beams).
      start_index: cache position of the first generated token.
      max_length: most tokens per sequence, EOS included; a beam still alive at that length
        competes with the finished ones as it is.
      beam_size: N.
      alpha: brevity-penalty exponent (T5X default 0.6; 0 ranks by log-likelihood).
      eos_id: end-of-sequence id.
    """
    B, V = logits_BV.shape
    N = beam_size
    if V < 2 * N:
        raise ValueError(f"beam search needs vocab_size >= 2 * beam_size, got {V} < {2 * N}")
    first_alive_BN = jnp.where(jnp.arange(N) == 0, 0.0, NEG_INF) * jnp.ones((B, 1))
    state = _BeamState(
        i=jnp.zeros([], jnp.int32),
        alive_BNL=jnp.zeros((B, N, max_length), jnp.int32),
        alive_log_prob_BN=first_alive_BN,
        finished_BNL=jnp.zeros((B, N, max_length), jnp.int32),
        finished_score_BN=jnp.full((B, N), NEG_INF),
        finished_log_prob_BN=jnp.full((B, N), NEG_INF),
        finished_length_BN=jnp.zeros((B, N), jnp.int32),
        logits_XV=jnp.repeat(logits_BV.astype(jnp.float32), N, axis=0),
        cache=cache_X,
    )
    bound_penalty = brevity_penalty(alpha, max_length)

    def body(s: _BeamState) -> _BeamState:
        length = s.i + 1
        log_p_BNV = jax.nn.log_softmax(s.logits_XV).reshape(B, N, V)
        candidate_BM = (s.alive_log_prob_BN[..., None] + log_p_BNV).reshape(B, N * V)
        # 2N candidates: even if N of them end in EOS, N can stay alive.
        log_prob_BK, (flat_BK,) = _top(candidate_BM, 2 * N, jnp.arange(N * V)[None].repeat(B, 0))
        parent_BK, token_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
        seqs_BKL = jnp.take_along_axis(s.alive_BNL, parent_BK[..., None], 1)
        seqs_BKL = jax.lax.dynamic_update_slice_in_dim(seqs_BKL, token_BK[..., None], s.i, 2)
        eos_BK = token_BK == eos_id

        alive_log_prob_BN, (alive_BNL, parent_BN, token_BN) = _top(
            jnp.where(eos_BK, NEG_INF, log_prob_BK), N, seqs_BKL, parent_BK, token_BK
        )
        # Candidates grown from the NEG_INF placeholder beams of the first step never finish.
        ended_BK = eos_BK & (log_prob_BK > NEG_INF / 2)
        new_score_BK = jnp.where(ended_BK, log_prob_BK / brevity_penalty(alpha, length), NEG_INF)
        finished = _merge_finished(s, seqs_BKL, new_score_BK, log_prob_BK, length, N)

        rows_X = (jnp.arange(B)[:, None] * N + parent_BN).reshape(B * N)
        cache = gather_cache(s.cache, rows_X)
        logits_XV, cache = step_fn(
            token_BN.reshape(B * N), cache, start_index + s.i, jnp.ones((B * N,), bool)
        )
        return _BeamState(length, alive_BNL, alive_log_prob_BN, *finished, logits_XV, cache)

    def cond(s: _BeamState):
        # Log-probs only fall, so an alive beam scores at most log_prob / penalty(max_length).
        best_alive_B = s.alive_log_prob_BN[:, 0] / bound_penalty
        worst_finished_B = s.finished_score_BN[:, -1]
        return (s.i < max_length) & ~jnp.all(worst_finished_B > best_alive_B)

    s = jax.lax.while_loop(cond, body, state)
    # Beams alive at max_length are candidates too (a row may have no finished beam at all).
    at_max = s.i >= max_length
    alive_score_BN = jnp.where(at_max, s.alive_log_prob_BN / bound_penalty, NEG_INF)
    tokens, score, log_prob, length = _merge_finished(
        s, s.alive_BNL, alive_score_BN, s.alive_log_prob_BN, s.i, N
    )
    return Beams(tokens, score, log_prob, length)


def _merge_finished(s: _BeamState, seqs_BKL, score_BK, log_prob_BK, length, n: int):
    """The n best of the finished beams so far and the new candidates."""
    K = score_BK.shape[1]
    length_BK = jnp.broadcast_to(jnp.asarray(length, jnp.int32), score_BK.shape[:1] + (K,))
    score_BM = jnp.concatenate([s.finished_score_BN, score_BK], 1)
    score_BN, (tokens, log_prob, lengths) = _top(
        score_BM,
        n,
        jnp.concatenate([s.finished_BNL, seqs_BKL], 1),
        jnp.concatenate([s.finished_log_prob_BN, log_prob_BK], 1),
        jnp.concatenate([s.finished_length_BN, length_BK], 1),
    )
    return tokens, score_BN, log_prob, lengths
