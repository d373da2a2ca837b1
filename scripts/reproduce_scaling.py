"""Small-scale reproduction of the Switch paper's scaling claims on the embedded corpus.

  python scripts/reproduce_scaling.py                 # ~1 hour on a 2-core CPU
  python scripts/reproduce_scaling.py --quick         # a few minutes: 2 and 4 experts, 60 steps
  python scripts/reproduce_scaling.py --steps=150 --experts=2,4,8,16 --batch_size=8

Trains, on the same batches of `embedded_span_corruption`, the dense T5 baseline and Switch
models with E experts at equal FLOPs per token (same shapes; every other FFN a Switch layer),
then writes to --out (default out/scaling):
  results.json              validation loss curves (step, training seconds) of every run
  loss_vs_step.png          the paper's Figure 1 (right) / Appendix D trend
  loss_vs_time.png          the same against training wall-clock (compilation excluded)
  speedup.png               steps for each Switch model to reach the dense model's final loss
and two selective checks on the Switch model with --check_experts experts (REFERENCE Tables 2, 3):
  float32 vs bfloat16 router, and init scale 0.1 vs 1.0 (over --seeds seeds).
Needs the `data` and `bench` extras (pip install -e .[data,bench]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from switch_jax import partitioning, steps
from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.run_config import OptimizerConfig

TASK = "embedded_span_corruption"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--experts", default="2,4,8,16,32", help="comma list of expert counts")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--inputs_length", type=int, default=128)
    p.add_argument("--targets_length", type=int, default=32)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--learning_rate", type=float, default=0.03, help="constant (Adafactor)")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--check_experts", type=int, default=8, help="E of the precision/init checks")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the init-scale check")
    p.add_argument("--no_checks", action="store_true", help="skip the Table 2 / 3 checks")
    p.add_argument("--quick", action="store_true", help="60 steps, experts 2,4, one seed")
    p.add_argument("--out", default="out/scaling")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.experts, args.seeds, args.eval_every = 60, "2,4", 1, 20
        args.batch_size, args.eval_batches = 8, 4
    args.experts = [int(e) for e in args.experts.split(",") if e]
    return args


def model_config(args, experts: int | None, **moe_changes) -> ModelConfig:
    moe = None
    if experts:
        moe = MoeConfig(num_experts=experts, group_size=512, sparse_every=2, **moe_changes)
    return ModelConfig(
        vocab_size=8192,  # the embedded corpus SentencePiece vocabulary
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_heads=4,
        head_dim=args.d_model // 4,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        moe=moe,
    )


def load_batches(args) -> tuple[list[dict], list[dict]]:
    """The same training batches for every run, and a fixed validation set."""
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow)

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    common = dict(feature_lengths=lengths, batch_size=args.batch_size)
    train_it = pipeline.make_batches(
        TASK, "train", architecture="encoder_decoder", seed=0, **common
    )
    train = [next(train_it) for _ in range(args.steps)]
    val_ds = pipeline.make_dataset(
        TASK, "validation", architecture="encoder_decoder", shuffle=False, repeat=True, **common
    )
    val = [{k: v.numpy() for k, v in b.items()} for b in val_ds.take(args.eval_batches)]
    return train, val


def train_run(name, model_cfg, args, train, val, seed=0) -> dict:
    """Train on `train`, evaluating every --eval_every steps; returns the curves."""
    part = partitioning.Partitioner((-1, 1, 1))
    model_cfg = part.adapt_model_config(model_cfg, args.batch_size)
    opt = OptimizerConfig(schedule="constant", learning_rate=args.learning_rate)
    with part.activate():
        setup = steps.setup_training(model_cfg, opt, part, seed=seed)
        state = setup.init_state()
        train_s, curve, t_compile = 0.0, [], 0.0
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            state, m = setup.train_step(state, part.shard_batch(train[step - 1]))
            loss = float(jax.device_get(m["loss"]))
            dt = time.perf_counter() - t0
            if step == 1:
                t_compile = dt  # compilation + one step: kept out of the wall-clock axis
            else:
                train_s += dt
            if step % args.eval_every == 0 or step == args.steps:
                ce = np.mean(
                    [
                        float(setup.eval_step(state.params, part.shard_batch(b))["cross_entropy"])
                        for b in val
                    ]
                )
                curve.append(
                    {"step": step, "train_s": train_s, "val_loss": float(ce), "train_loss": loss}
                )
                print(
                    f"{name} step {step}: train {loss:.3f} val {ce:.3f} ({train_s:.0f}s)",
                    flush=True,
                )
    return {
        "name": name,
        "seed": seed,
        "compile_s": t_compile,
        "curve": curve,
        "finite": all(math.isfinite(c["val_loss"]) for c in curve),
    }


def steps_to_reach(curve: list[dict], target: float, key: str = "step") -> float | None:
    """First `key` value where the validation loss reaches `target` (linear interpolation)."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return float(point[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev[key] + frac * (point[key] - prev[key])
        prev = point
    return None


def speedups(runs: dict) -> dict:
    dense = runs["dense"]["curve"]
    target, last = dense[-1]["val_loss"], dense[-1]
    out = {}
    for name, run in runs.items():
        if name == "dense":
            continue
        s = steps_to_reach(run["curve"], target)
        t = steps_to_reach(run["curve"], target, "train_s")
        out[name] = {
            "steps_to_dense_final": s,
            "step_speedup": last["step"] / s if s else None,
            "time_speedup": last["train_s"] / t if t else None,
            "final_val_loss": run["curve"][-1]["val_loss"],
        }
    return {"dense_final_val_loss": target, "switch": out}


def plot(runs: dict, summary: dict, out: str) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    for key, label, fname in (
        ("step", "training step", "loss_vs_step.png"),
        ("train_s", "training seconds (2-core CPU)", "loss_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
        for name, run in runs.items():
            xs = [p[key] for p in run["curve"]]
            ax.plot(
                xs,
                [p["val_loss"] for p in run["curve"]],
                label=name,
                color="black" if name == "dense" else None,
                lw=2 if name == "dense" else 1.2,
            )
        ax.axhline(summary["dense_final_val_loss"], color="gray", ls=":", lw=0.8)
        ax.set(
            xlabel=label,
            ylabel="validation cross-entropy",
            title="Dense T5 vs Switch, equal FLOPs/token",
        )
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, fname))
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=90)
    names = [n for n, s in summary["switch"].items() if s["step_speedup"]]
    ax.plot(
        [int(n.split("-")[1]) for n in names],
        [summary["switch"][n]["step_speedup"] for n in names],
        "o-",
    )
    ax.set(
        xscale="log",
        xlabel="experts",
        ylabel="step speedup to dense final loss",
        title="Speedup vs experts",
    )
    fig.tight_layout()
    paths.append(os.path.join(out, "speedup.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t_start = time.perf_counter()
    train, val = load_batches(args)
    runs = {"dense": train_run("dense", model_config(args, None), args, train, val)}
    for e in args.experts:
        runs[f"switch-{e}"] = train_run(f"switch-{e}", model_config(args, e), args, train, val)
    summary = speedups(runs)
    checks = {}
    if not args.no_checks:
        e = args.check_experts
        base = runs.get(f"switch-{e}") or train_run(
            f"switch-{e}", model_config(args, e), args, train, val
        )
        checks["router_dtype"] = {
            "float32": base,
            "bfloat16": train_run(
                "bf16-router", model_config(args, e, router_dtype="bfloat16"), args, train, val
            ),
        }
        init = {"0.1": [base], "1.0": []}
        for seed in range(args.seeds):
            if seed:
                init["0.1"].append(
                    train_run(f"init0.1-s{seed}", model_config(args, e), args, train, val, seed)
                )
            cfg = dataclasses.replace(model_config(args, e), init_scale=1.0)
            init["1.0"].append(train_run(f"init1.0-s{seed}", cfg, args, train, val, seed))
        checks["init_scale"] = {
            k: {"final_val_loss": [r["curve"][-1]["val_loss"] for r in v], "runs": v}
            for k, v in init.items()
        }
    results = {
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "checks": checks,
        "total_s": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(runs, summary, args.out)
    print(json.dumps(summary, indent=1))
    for name, c in checks.items():
        for k, v in c.items():
            finals = v["final_val_loss"] if "final_val_loss" in v else v["curve"][-1]["val_loss"]
            print(f"{name} {k}: final val loss {finals}")
    print(f"total {results['total_s'] / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    main()
