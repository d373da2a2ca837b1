"""One MoeLayer forward + backward on [G, T, D] inputs: cost per token of einsum vs scatter
dispatch as the group size T and the expert count E grow (total tokens held fixed).

Legend: G groups, T tokens per group, D d_model, E experts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from switch_jax.benchmarks import timing
from switch_jax.models.config import ModelConfig
from switch_jax.models.layers import Keys
from switch_jax.models.moe import MoeLayer

NO_NOISE = Keys()


def layer_step(cfg: ModelConfig, group_size: int, total_tokens: int):
    """(jitted fwd+bwd of one MoE layer, its arguments) for tokens split into groups of T."""
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, group_size=group_size))
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    key_x, key_g = jax.random.split(jax.random.PRNGKey(1))
    x_BLD = jax.random.normal(key_x, (total_tokens // group_size, group_size, cfg.d_model))
    x_BLD = x_BLD.astype(cfg.dtype)
    mask_BL = jnp.ones(x_BLD.shape[:2], jnp.int32)
    cotangent_BLD = jax.random.normal(key_g, x_BLD.shape, x_BLD.dtype)

    def loss(params, x_BLD):
        y_BLD, stats = nnx.merge(graphdef, params)(x_BLD, mask_BL, NO_NOISE, train=True)
        y = jnp.sum(y_BLD.astype(jnp.float32) * cotangent_BLD.astype(jnp.float32))
        return y + cfg.moe.aux_loss_coef * stats.aux_loss

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BLD)


def bench_dispatch(
    cfg: ModelConfig,
    *,
    group_sizes: list[int],
    experts: list[int],
    dispatches=("einsum", "scatter"),
    total_tokens: int = 8192,
    repeats: int = 5,
) -> list[dict]:
    """One row per (dispatch, E, T): median time per call and nanoseconds per token."""
    rows = []
    for dispatch in dispatches:
        for num_experts in experts:
            moe = dataclasses.replace(cfg.moe, num_experts=num_experts, dispatch=dispatch)
            for group_size in group_sizes:
                fn, args = layer_step(cfg.replace(moe=moe), group_size, total_tokens)
                t0 = time.perf_counter()
                compiled = fn.lower(*args).compile()
                compile_s = time.perf_counter() - t0
                t = timing.time_calls(lambda c=compiled, a=args: c(*a), repeats, warmup=1)
                rows.append(
                    {
                        "dispatch": dispatch,
                        "experts": num_experts,
                        "group_size": group_size,
                        "tokens": total_tokens,
                        "compile_s": compile_s,
                        "median_s": t["median_s"],
                        "spread": t["spread"],
                        "ns_per_token": 1e9 * t["median_s"] / total_tokens,
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
