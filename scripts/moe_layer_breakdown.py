"""Process-CPU-time breakdown of one Switch layer vs the dense FFN at the issue-15 CPU config.

    python scripts/moe_layer_breakdown.py      # ~3 min of CPU; figures in docs/benchmarks.md §6
    python scripts/moe_layer_breakdown.py --only='dense FFN, threefry|scatter, threefry|fused'
    python scripts/moe_layer_breakdown.py --dtype=float32

One layer fwd+bwd on 4096 tokens (groups of 512), d_model 512, d_ff 2048, 8 experts, capacity
factor 1.25, dropout 0.1 (expert too), jitter 0.01, per dispatch and PRNG, and an Adafactor
update (optax's factored Adafactor) over one layer's expert kernels vs the dense FFN's, all
timed interleaved. CPU time, not wall time, because the development machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.tools.benchmarks import timing
from switch_jax.tools.benchmarks.breakdown import _ffn_step

TOKENS = 4096
BASE = ModelConfig(
    d_model=512,
    d_ff=2048,
    num_heads=8,
    head_dim=64,
    dropout_rate=0.1,
    moe=MoeConfig(
        num_experts=8,
        group_size=512,
        capacity_factor_train=1.25,
        jitter_eps=0.01,
        expert_dropout_rate=0.1,
    ),
)


def switch(dispatch: str, rng: str = "threefry", **moe) -> ModelConfig:
    return BASE.replace(rng_impl=rng, moe=dataclasses.replace(BASE.moe, dispatch=dispatch, **moe))


def adafactor_update(shapes):
    params = {f"w{i}": jnp.full(s, 0.01, jnp.float32) for i, s in enumerate(shapes)}
    tx = optax.adafactor(learning_rate=1e-2)
    state = tx.init(params)
    update = jax.jit(lambda p, s: tx.update(p, s, p))
    return lambda: update(params, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="'|'-separated substrings of row names")
    parser.add_argument("--dtype", default=BASE.dtype, help="activation dtype of every row")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dense = BASE.replace(moe=None)
    variants = [
        ("dense FFN, threefry", dense, False),
        ("scatter, threefry", switch("scatter"), True),
        ("sorted, threefry", switch("sorted"), True),
        ("einsum, threefry", switch("einsum"), True),
        ("dropless (blocked), threefry", switch("dropless"), True),
        ("sorted (fused), threefry", switch("sorted", grouped_matmul="fused"), True),
        ("dropless (fused), threefry", switch("dropless", grouped_matmul="fused"), True),
        ("dense FFN, rbg", dense.replace(rng_impl="rbg"), False),
        ("scatter, rbg", switch("scatter", "rbg"), True),
        ("dense FFN, no noise", dense.replace(dropout_rate=0.0), False),
        ("scatter, no noise", switch("scatter", jitter_eps=0.0, expert_dropout_rate=0.0), True),
    ]
    only = [w for w in args.only.split("|") if w]
    wanted = lambda name: not only or any(w in name for w in only)  # noqa: E731
    names, fns = [], []
    for name, cfg, sparse in variants:
        if not wanted(name):
            continue
        cfg = cfg.replace(dtype=args.dtype)
        t0 = time.process_time()
        fns.append(_ffn_step(cfg, TOKENS, sparse))
        names.append(name)
        print(f"compiled {name}: {time.process_time() - t0:.1f} s CPU", flush=True)
    for name, shapes in [
        ("Adafactor, one layer's expert kernels", [(8, 512, 2048), (8, 2048, 512)]),
        ("Adafactor, the dense FFN kernels", [(512, 2048), (2048, 512)]),
    ]:
        if wanted(name):
            fns.append(adafactor_update(shapes))
            names.append(name)
    wall, cpu = timing.interleaved(fns, args.repeats, warmup=1)
    for name, w, c in zip(names, wall, cpu, strict=True):
        print(f"{name:40s} CPU {statistics.median(c):.3f} s  wall {statistics.median(w):.3f} s")


if __name__ == "__main__":
    main()
