"""One MoeLayer forward + backward on [G, T, D] inputs: cost per token of every dispatch as the
group size T and the expert count E grow (total tokens and FLOPs per token held fixed), next to
the dense FFN of the same shape, timed interleaved.

Legend: G groups, T tokens per group, D d_model, E experts.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.models.layers import Keys, Mlp
from switch_jax.models.moe import MoeLayer
from switch_jax.tools.benchmarks import timing

DISPATCHES = ("einsum", "scatter", "sorted", "dropless")

NO_NOISE = Keys()  # dispatch cost alone: the noise is the same for every dispatch


def layer_step(cfg: ModelConfig, group_size: int, total_tokens: int):
    """(jitted fwd+bwd of one MoE layer, its arguments) for tokens split into groups of T."""
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, group_size=group_size))
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    key_x, key_g = jax.random.split(jax.random.PRNGKey(1))
    x_BLD = jax.random.normal(key_x, (total_tokens // group_size, group_size, cfg.d_model))
    x_BLD = x_BLD.astype(cfg.dtype)
    mask_BL = jnp.ones(x_BLD.shape[:2], jnp.int32)
    # A random cotangent instead of sum(y): with all-ones XLA could simplify the backward pass
    # of the combine, which the real loss never allows.
    cotangent_BLD = jax.random.normal(key_g, x_BLD.shape, x_BLD.dtype)

    def loss(params, x_BLD):
        y_BLD, stats = nnx.merge(graphdef, params)(x_BLD, mask_BL, NO_NOISE, train=True)
        y = jnp.sum(y_BLD.astype(jnp.float32) * cotangent_BLD.astype(jnp.float32))
        return y + cfg.moe.aux_loss_coef * stats.aux_loss

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BLD)


def dense_step(cfg: ModelConfig, total_tokens: int):
    """(jitted fwd+bwd of the dense FFN of the same shape, its arguments)."""
    mlp = Mlp(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp, nnx.Param)
    x_BLD = jax.random.normal(jax.random.PRNGKey(1), (1, total_tokens, cfg.d_model))
    x_BLD = x_BLD.astype(cfg.dtype)

    def loss(params, x_BLD):
        return jnp.sum(nnx.merge(graphdef, params)(x_BLD, NO_NOISE).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BLD)


def moe_variant(moe: MoeConfig, name: str) -> MoeConfig:
    """`moe` with the dispatch `name` names: 'scatter', or 'sorted:fused' (dispatch and
    grouped_matmul)."""
    dispatch, _, impl = name.partition(":")
    changes = {"dispatch": dispatch} | ({"grouped_matmul": impl} if impl else {})
    return dataclasses.replace(moe, **changes)


def _compiled(fn, args):
    # Compile apart from the timed calls: the compile time is a result of its own.
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def bench_dispatch(
    cfg: ModelConfig,
    *,
    group_sizes: list[int],
    experts: list[int],
    dispatches=DISPATCHES,
    total_tokens: int = 8192,
    repeats: int = 5,
) -> list[dict]:
    """One row per (dispatch, E, T): median wall and CPU time per call, nanoseconds per token
    and the ratio to the dense FFN timed in the same interleaved loop."""
    dense, dense_args = dense_step(cfg, total_tokens)
    dense, _ = _compiled(dense, dense_args)
    rows = []
    for num_experts in experts:
        for group_size in group_sizes:
            point = []
            for dispatch in dispatches:
                moe = moe_variant(dataclasses.replace(cfg.moe, num_experts=num_experts), dispatch)
                fn, args = layer_step(cfg.replace(moe=moe), group_size, total_tokens)
                point.append((dispatch, args, *_compiled(fn, args)))
            calls = [lambda c=c, a=a: c(*a) for _, a, c, _ in point]
            wall, cpu = timing.interleaved([*calls, lambda: dense(*dense_args)], repeats)
            dense_s = statistics.median(wall[-1])
            for (dispatch, _, _, compile_s), w, c in zip(point, wall, cpu, strict=False):
                t = timing.summarize(w)
                rows.append(
                    {
                        "dispatch": dispatch,
                        "experts": num_experts,
                        "group_size": group_size,
                        "tokens": total_tokens,
                        "compile_s": compile_s,
                        "median_s": t["median_s"],
                        "cpu_s": statistics.median(c),
                        "spread": t["spread"],
                        "ns_per_token": 1e9 * t["median_s"] / total_tokens,
                        "over_dense_ffn": t["median_s"] / dense_s,
                        "over_dense_ffn_cpu": statistics.median(c) / statistics.median(cpu[-1]),
                    }
                )
    return rows


def scaling(rows: list[dict]) -> dict:
    """Per (dispatch, E): cost per token at the largest group / at the smallest group."""
    out = {}
    for row in rows:
        key = f"{row['dispatch']}/E{row['experts']}"
        out.setdefault(key, []).append((row["group_size"], row["ns_per_token"]))
    return {k: max(v)[1] / min(v)[1] for k, v in out.items()}
