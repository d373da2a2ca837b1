"""Sparse upcycling vs continuing dense, from the same dense checkpoint (docs/benchmarks.md §2.2).

  python scripts/upcycle_curve.py --out=out/upcycle            # ~10 minutes on 2 idle CPU cores
  python scripts/upcycle_curve.py --dense_steps=20 --extra_steps=20 --out=/tmp/up   # smoke

1. trains the dense twin of the demo model (runs/demo.gin with ModelConfig.moe=None) for
   --dense_steps;
2. continues it for --extra_steps as it was (INIT_RESTORE='all': optimizer and schedule carry on);
3. upcycles the same checkpoint into the demo's Switch model (runs/upcycle.gin: 8 experts in
   every other layer, each a copy of its dense FFN, fresh router and optimizer) and trains it for
   --extra_steps.
Both arms cost the same FLOPs per token (top-1 routing); each reads the task with the run's seed.
Prints the validation loss of both arms at every evaluation and writes results.json and
upcycle.png into --out. Runs that already finished are reused (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _train(model_dir: str, *bindings: str, gin_files=("runs/demo.gin",)) -> float:
    """One `python -m switch_jax.train` run; its wall-clock seconds (0 if it had finished)."""
    if os.path.exists(os.path.join(model_dir, "done")):
        return json.loads(open(os.path.join(model_dir, "done")).read())["seconds"]
    command = [sys.executable, "-m", "switch_jax.train"]
    command += [f"--gin_file={f}" for f in gin_files]
    command += [f"--gin.MODEL_DIR='{model_dir}'", *(f"--gin.{b}" for b in bindings)]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(model_dir, "done"), "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def _eval_curve(model_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(model_dir, "eval", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["cross_entropy"]) for r in rows if "cross_entropy" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/upcycle")
    parser.add_argument("--dense_steps", type=int, default=300)
    parser.add_argument("--extra_steps", type=int, default=300)
    parser.add_argument("--eval_period", type=int, default=50)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    common = [f"EVAL_PERIOD={args.eval_period}", "EVAL_STEPS=10", "LOG_PERIOD=50"]
    dense, cont, up = (os.path.join(out, n) for n in ("dense", "dense_continued", "upcycled"))
    n, extra = args.dense_steps, args.extra_steps
    _train(dense, "ModelConfig.moe=None", f"TRAIN_STEPS={n}", f"CHECKPOINT_PERIOD={n}", *common)
    seconds = {
        "dense": _train(
            cont, "ModelConfig.moe=None", f"INIT_CHECKPOINT='{dense}'", "INIT_RESTORE='all'",
            f"TRAIN_STEPS={n + extra}", f"CHECKPOINT_PERIOD={n + extra}", *common,
        ),
        "upcycled": _train(
            up, f"INIT_CHECKPOINT='{dense}'", f"TRAIN_STEPS={extra}",
            f"CHECKPOINT_PERIOD={extra}", *common,
            gin_files=("runs/demo.gin", "runs/upcycle.gin"),
        ),
    }  # fmt: skip
    curves = {
        "dense": [(s - n, ce) for s, ce in _eval_curve(cont)],
        "upcycled": _eval_curve(up),
        "dense_start": _eval_curve(dense)[-1],
    }
    results = {"dense_steps": n, "extra_steps": extra, "seconds": seconds, "curves": curves}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"dense checkpoint at step {n}: validation cross-entropy {curves['dense_start'][1]:.4f}")
    print("extra steps | dense continued | upcycled Switch-8")
    upcycled = dict(curves["upcycled"])
    for step, ce in curves["dense"]:
        print(f"{step:>11} | {ce:>15.4f} | {upcycled.get(step, float('nan')):>17.4f}")
    print(f"wall-clock of the extra steps: dense {seconds['dense']:.0f}s, "
          f"upcycled {seconds['upcycled']:.0f}s")  # fmt: skip
    _plot(curves, os.path.join(out, "upcycle.png"))


def _plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("dense", "dense, continued"), ("upcycled", "upcycled Switch-8")):
        steps, ce = zip(*curves[name], strict=True)
        ax.plot(steps, ce, marker="o", label=label)
    ax.axhline(curves["dense_start"][1], color="gray", linestyle=":", label="dense checkpoint")
    ax.set_xlabel("steps after the dense checkpoint")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title("Sparse upcycling vs continuing dense (equal FLOPs per token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
