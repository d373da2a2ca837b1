"""Compare the routing methods of docs/configs.md on one run config: loss, drops, balance, speed.

    python scripts/compare_routing.py --out=out/routing                  # demo model, 200 steps
    python scripts/compare_routing.py --out=out/routing --steps=600 --methods=top1,expert_choice
    python scripts/compare_routing.py --out=out/routing --report_only    # table from results.json

Each method is the same `python -m switch_jax.train` command (default --gin_file=runs/demo.gin:
the demo's Switch encoder-decoder on the embedded corpus) with the method's gin bindings added,
so every run sees the same batches from the same initial weights (the run seed is fixed); the
runs go one after another, each in its own MODEL_DIR under --out, and a finished one is not run
again. The table (markdown, printed and written to --out/routing.md) gives per method: the
final validation loss and cross-entropy, the fraction of token assignments dropped (mean over
the logged steps, and at the last one), the busiest / idlest expert load over every MoE layer
(as a multiple of an even share, at the last logged step), and the median logged step time with
the load average the machine had while that run trained (step times on a shared machine are
comparable only at similar load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

METHODS = {
    "top1": [],
    "top1_loss_free": ["--gin.MoeConfig.load_balancing='loss_free'"],
    # DeepSeek-V3's rate (1e-3) moves a bias by at most 0.2 in 200 steps; 1e-2 shows what a
    # rate matched to a short run does.
    "top1_loss_free_1e-2": [
        "--gin.MoeConfig.load_balancing='loss_free'",
        "--gin.MoeConfig.bias_update_rate=0.01",
    ],
    "top1_aux_and_bias": ["--gin.MoeConfig.load_balancing='both'"],
    "top2_flaxformer": ["--gin.MoeConfig.top_k=2"],
    "top2_mesh_tf": ["--gin.MoeConfig.routing='mesh_tf_top2'", "--gin.MoeConfig.top_k=2"],
    # Capacity counts an expert's slots, not picks (flaxformer, Mesh TF): top-2 at the top-1
    # factor drops a third of its assignments. The paper's Table 1 MoE runs at factor 2.0.
    "top2_mesh_tf_cf2.5": [
        "--gin.MoeConfig.routing='mesh_tf_top2'",
        "--gin.MoeConfig.top_k=2",
        "--gin.MoeConfig.capacity_factor_train=2.5",
    ],
    "expert_choice_enc": [
        "--gin.MoeConfig.routing='expert_choice'",
        "--gin.MoeConfig.decoder_routing='token_choice'",
    ],
    "top1_dropless": ["--gin.MoeConfig.dispatch='dropless'"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, results.json, routing.md")
    p.add_argument("--gin_file", action="append", default=None, help="default: runs/demo.gin")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_steps", type=int, default=10)
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS)
    )
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    args.gin_file = args.gin_file or ["runs/demo.gin"]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return args


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(args, method: str) -> dict:
    model_dir = os.path.join(args.out, method)
    done = os.path.join(model_dir, "routing_run.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    command = [
        sys.executable,
        "-m",
        "switch_jax.train",
        *(f"--gin_file={g}" for g in args.gin_file),
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={args.steps}",
        f"--gin.EVAL_PERIOD={args.steps}",
        f"--gin.EVAL_STEPS={args.eval_steps}",
        f"--gin.CHECKPOINT_PERIOD={args.steps}",
        *METHODS[method],
    ]
    print(f"[{method}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    subprocess.run(command, check=True)
    summary = summarise(model_dir)
    summary.update(method=method, bindings=METHODS[method])
    summary["load_average"] = round((load_before + os.getloadavg()[0]) / 2, 1)
    with open(done, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarise(model_dir: str) -> dict:
    train_rows = _rows(os.path.join(model_dir, "train", "metrics.jsonl"))
    eval_rows = _rows(os.path.join(model_dir, "eval", "metrics.jsonl"))
    if not train_rows or not eval_rows:
        raise SystemExit(f"{model_dir}: no train or eval metrics.jsonl; did the run finish?")
    last, final = train_rows[-1], eval_rows[-1]
    dropped = [r["moe/fraction_dropped"] for r in train_rows if "moe/fraction_dropped" in r]
    times = [r["step_time"] for r in train_rows[1:] if "step_time" in r]  # the first holds compile
    return {
        "steps": last["step"],
        "eval_loss": final.get("loss"),
        "eval_cross_entropy": final.get("cross_entropy"),
        "dropped_mean": statistics.fmean(dropped) if dropped else None,
        "dropped_last": dropped[-1] if dropped else None,
        "load_max_last": last.get("moe/expert_usage_max"),
        "load_min_last": last.get("moe/expert_usage_min"),
        "step_time_median": statistics.median(times) if times else None,
    }


def markdown(results: list[dict]) -> str:
    def f(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        "| method | bindings | val loss | val CE | dropped mean / last | load max / min (last) "
        "| step time (median) | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bindings = " ".join(f"`{b.removeprefix('--gin.')}`" for b in r["bindings"]) or "(default)"
        lines.append(
            f"| {r['method']} | {bindings} | {f(r['eval_loss'], '.4f')} | "
            f"{f(r['eval_cross_entropy'], '.4f')} | {f(r['dropped_mean'], '.1%')} / "
            f"{f(r['dropped_last'], '.1%')} | {f(r['load_max_last'], '.2f')}x / "
            f"{f(r['load_min_last'], '.2f')}x | {f(r['step_time_median'], '.3f')} s | "
            f"{r['load_average']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for method in args.methods:
        if args.report_only:
            path = os.path.join(args.out, method, "routing_run.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            continue
        results.append(train(args, method))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(args.out, "routing.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
