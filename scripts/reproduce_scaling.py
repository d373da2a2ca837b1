"""Small-scale reproduction of the Switch paper: dense vs Switch-E, sparse upcycling, distillation.

  python scripts/reproduce_scaling.py                      # --scale=lm: every table and PNG of
                                                           # docs/benchmarks.md §2.1-2.3
  python scripts/reproduce_scaling.py --scale=smoke        # ~3 minutes, checks the whole path
  python scripts/reproduce_scaling.py --scale=gpu          # the larger version for one GPU
  python scripts/reproduce_scaling.py --scale=cpu          # the earlier T5 design (§2.4, 76 min)
  python scripts/reproduce_scaling.py --phases=distill     # one phase, on the saved runs
  python scripts/scaling_report.py --out=out/scaling_lm    # plots + tables from results.json again

A killed or finished run resumes: every run already in --out/results.json is kept, not trained
again (the settings that define the runs must match; more --seeds or --experts are added).

`--architecture=decoder_only` trains a plain LM (the corpus' LM task: every token a target)
instead of T5 on span corruption; `--capacity_factor` sets the training capacity (or pass
`--dispatch=dropless`), `--layers` the depth of each stack. Phase `scaling` trains, on the same
batches, the dense baseline and Switch models with E experts at equal FLOPs per token (same
shapes, every FFN of the `--sparse_every` pattern a Switch layer), for each of --seeds seeds
(seed s = init seed s and data order s, shared by all models so that differences between models
are paired). Phase `upcycle` (scripts/upcycle_phase.py) upcycles each seed's dense run at
--upcycle_at into Switch-E (--upcycle_experts) and trains it on that run's remaining batches,
beside the dense run continued. Phase `distill` distils each seed's Switch teacher
(--distill_experts) into its dense twin with switch_jax.training.distill (student
initialised from the teacher's non-expert weights, 0.25 x soft + 0.75 x hard loss; paper §4.2),
plus, for seed 0, the two ablations of Table 6 (init only, distillation without init). Phase
`checks` (not run by default) trains that Switch model with a bfloat16 router (Table 2) and with
the 1.0x init scale (Table 3). Outputs in --out:
  results.json       every run's validation curve (step, training seconds, dropped fraction,
                     busiest / idlest expert), step time, per-layer expert loads, tokens read
  teachers/          each seed's Switch parameters (phase `distill` reads --distill_experts')
  *.png              loss vs step / vs wall-clock, step speedup vs experts, distillation gain
                     kept, upcycled vs continued dense
Needs the `data` and `plot` extras (pip install -e '.[data,plot]'); both are checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# Text of the embedded task: the standard library's docstrings (1.6 MB, the demo's corpus), or
# those of the standard library and the installed packages (up to --corpus_bytes, ~6x more).
CORPORA = ("stdlib", "installed")

# Each scale is a full set of defaults; any flag given explicitly overrides it.
SCALES = {
    # The demo's layout (d_model 128, 2+2 layers, layer 1 of each stack a Switch layer, vocab
    # 8192) at batch 16 x 128/32, float32 activations (XLA:CPU's batched matmuls are slow in
    # bf16), one MoE group per batch, on the ~10 MB installed-docstrings corpus. 3 seeds x
    # (dense, E = 2, 8, 32) + the distillations fill 76 min of an idle 2-core machine; at these
    # 1.5 M tokens per run the expert-count trend does not show (docs/benchmarks.md §2.4).
    "cpu": dict(
        experts="2,8,32",
        seeds=3,
        steps=600,
        batch_size=16,
        inputs_length=128,
        targets_length=32,
        d_model=128,
        d_ff=512,
        heads=4,
        layers=2,
        sparse_every=2,
        vocab_size=8192,
        learning_rate=0.03,
        eval_every=50,
        eval_batches=12,
        eval_batch_size=32,
        dtype="float32",
        dispatch="auto",
        group_size=2048,
        corpus="installed",
        architecture="encoder_decoder",
        capacity_factor=1.25,
        corpus_bytes=10_000_000,
    ),
    "smoke": dict(
        experts="2,4",
        seeds=2,
        steps=12,
        batch_size=8,
        inputs_length=32,
        targets_length=8,
        d_model=32,
        d_ff=64,
        heads=2,
        layers=1,
        sparse_every=1,
        vocab_size=2048,
        learning_rate=0.05,
        eval_every=6,
        eval_batches=2,
        eval_batch_size=8,
        dtype="float32",
        dispatch="auto",
        group_size=256,
        corpus="stdlib",
        architecture="encoder_decoder",
        capacity_factor=1.25,
        corpus_bytes=10_000_000,
    ),
    # Unmeasured (no accelerator this session): Switch-Base-like layout at d_model 512. The
    # embedded corpus (1.6 MB) would be repeated ~100 times: prefer --task=c4_v301_span_corruption
    # --vocab_size=32128 where C4 is available.
    "gpu": dict(
        experts="2,4,8,16,32,64",
        seeds=3,
        steps=3000,
        batch_size=64,
        inputs_length=256,
        targets_length=64,
        d_model=512,
        d_ff=2048,
        heads=8,
        layers=4,
        sparse_every=2,
        vocab_size=8192,
        learning_rate=0.03,
        eval_every=200,
        eval_batches=32,
        eval_batch_size=64,
        dtype="bfloat16",
        dispatch="auto",
        group_size=4096,
        corpus="installed",
        architecture="encoder_decoder",
        capacity_factor=1.25,
        corpus_bytes=10_000_000,
    ),
    # Issue 22's levers against the `cpu` design's flat result: a decoder-only LM (every token
    # a target: 2,048 targets per step instead of span corruption's ~512), every FFN a Switch
    # layer, capacity 2.0 (few drops once the router settles); same width, vocab and corpus.
    # 2 seeds x (dense, E = 2, 8), scaling phase only: ~25 min on the shared 2-core machine.
    "pilot": dict(
        experts="2,8",
        seeds=2,
        steps=300,
        batch_size=16,
        inputs_length=0,
        targets_length=128,
        d_model=128,
        d_ff=512,
        heads=4,
        layers=2,
        sparse_every=1,
        vocab_size=8192,
        learning_rate=0.03,
        eval_every=50,
        eval_batches=8,
        eval_batch_size=32,
        dtype="float32",
        dispatch="auto",
        group_size=2048,
        corpus="installed",
        architecture="decoder_only",
        capacity_factor=2.0,
        corpus_bytes=10_000_000,
    ),
    # The design that shows the effect on 2 CPU cores (docs/benchmarks.md §2.1): a model small
    # enough to read ~6.5 M tokens per run in ~6 minutes (d_model 64, 2 layers, vocab 1024, so
    # the FFNs are most of the FLOPs), i.e. ~25 tokens per dense parameter, where a model is
    # limited by its parameters and more of them at the same FLOPs (experts) should pay; a
    # decoder-only LM (every token a target), every FFN a Switch layer, capacity 2.0.
    "lm": dict(
        experts="2,8,32",
        seeds=3,
        steps=1600,
        batch_size=32,
        inputs_length=0,
        targets_length=128,
        d_model=64,
        d_ff=256,
        heads=4,
        layers=2,
        sparse_every=1,
        vocab_size=1024,
        learning_rate=0.03,
        eval_every=200,
        eval_batches=8,
        eval_batch_size=32,
        dtype="float32",
        dispatch="auto",
        group_size=4096,
        corpus="installed",
        architecture="decoder_only",
        capacity_factor=2.0,
        corpus_bytes=24_000_000,  # ~1 pass over the text in 6.5 M tokens at vocab 1024
    ),
}
ARCHITECTURES = ("encoder_decoder", "decoder_only")
# Scales whose default phases are not "scaling,distill".
PHASES = {"pilot": "scaling", "lm": "scaling,upcycle,distill"}
# Settings a resumed --out must share with the run that wrote it (seeds and experts may grow).
RUN_DEFINING = [k for k in SCALES["cpu"] if k not in ("experts", "seeds")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="lm")
    p.add_argument(
        "--phases",
        default=None,
        help="comma list of scaling, upcycle, distill, checks (default scaling,distill; "
        "pilot: scaling; lm: scaling,upcycle,distill)",
    )
    p.add_argument("--out", default=None, help="default out/scaling_<scale>")
    p.add_argument("--no_plots", action="store_true", help="skip the PNGs (no matplotlib)")
    p.add_argument("--distill_experts", type=int, default=None, help="teacher E (default: max)")
    p.add_argument("--soft_weight", type=float, default=0.25, help="weight of the teacher CE")
    p.add_argument("--no_ablations", action="store_true", help="skip Table 6's ablations")
    p.add_argument(
        "--task",
        default=None,
        help="default: the corpus' span-corruption or LM task (--architecture)",
    )
    p.add_argument(
        "--upcycle_experts", type=int, default=None, help="phase upcycle's E (default 8, or max)"
    )
    p.add_argument(
        "--upcycle_at", type=int, default=None, help="the dense step it upcycles (default half)"
    )
    p.add_argument(
        "--upcycle_gates",
        default="keep,compensate",
        help="UPCYCLE_GATE values to run (training/upcycle.py): keep, compensate",
    )
    for name, value in SCALES["cpu"].items():
        p.add_argument(f"--{name}", type=type(value), default=None)
    args = p.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.experts = [int(e) for e in str(args.experts).split(",") if e]
    args.distill_experts = args.distill_experts or max(args.experts)
    args.upcycle_experts = args.upcycle_experts or (8 if 8 in args.experts else max(args.experts))
    args.upcycle_gates = [g for g in args.upcycle_gates.split(",") if g]
    if not args.upcycle_gates or set(args.upcycle_gates) - {"keep", "compensate"}:
        p.error("--upcycle_gates must be a comma list of keep, compensate")
    if args.upcycle_at is None:
        args.upcycle_at = args.steps // 2 // args.eval_every * args.eval_every
    phases = args.phases or PHASES.get(args.scale, "scaling,distill")
    args.phases = [x for x in phases.split(",") if x]
    args.out = args.out or os.path.join("out", f"scaling_{args.scale}")
    if args.corpus not in CORPORA:
        p.error(f"--corpus must be one of {', '.join(CORPORA)}")
    if args.architecture not in ARCHITECTURES:
        p.error(f"--architecture must be one of {', '.join(ARCHITECTURES)}")
    if args.capacity_factor <= 0:
        p.error(
            f"--capacity_factor={args.capacity_factor} must be > 0 (or pass --dispatch=dropless)"
        )
    if args.architecture == "encoder_decoder" and args.inputs_length < 1:
        p.error("--inputs_length must be >= 1 for --architecture=encoder_decoder")
    if args.eval_every < 1 or args.steps < args.eval_every:
        p.error("--eval_every must be in [1, --steps]")
    if not 0 < args.upcycle_at < args.steps or args.upcycle_at % args.eval_every:
        p.error("--upcycle_at must be a multiple of --eval_every in (0, --steps)")
    return args


def check_extras(args) -> None:
    """Fail before any training: the plots and the data need optional extras."""
    missing = []
    try:
        import switch_jax.data  # noqa: F401, PLC0415
    except ImportError as e:
        missing.append(f"data ({e.name})")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            missing.append("plot (matplotlib, for the PNGs; or pass --no_plots)")
    if missing:
        sys.exit(
            "reproduce_scaling.py needs the extras: "
            + ", ".join(missing)
            + ". Install them with: pip install -e '.[data,plot]'"
        )


def settings_differ(saved: dict, now: dict) -> list[str]:
    """The run-defining settings two runs' args disagree on, as 'k: saved there, now now'."""
    return [
        f"{k}: {saved[k]!r} there, {now.get(k)!r} now"
        for k in RUN_DEFINING
        if k in saved and saved[k] != now.get(k)
    ]


def check_same_run(args, saved: dict, path: str) -> None:
    """A resumed --out must hold runs of the same design (more seeds or experts are fine)."""
    differ = settings_differ(saved, vars(args))
    if differ:
        sys.exit(
            f"{path} holds runs of other settings ({'; '.join(differ)}): pass those settings "
            "to resume it, or another --out"
        )


def model_config(args, experts: int | None):
    from switch_jax.models.config import ModelConfig, MoeConfig  # noqa: PLC0415

    moe = None
    if experts:
        moe = MoeConfig(
            num_experts=experts,
            sparse_every=args.sparse_every,
            group_size=args.group_size,
            dispatch=args.dispatch,
            capacity_factor_train=args.capacity_factor,
            # Evaluation at the library's 2.0 (or more): a dropped token there would measure
            # the capacity, not the model.
            capacity_factor_eval=max(2.0, args.capacity_factor),
        )
    decoder_only = args.architecture == "decoder_only"
    return ModelConfig(
        architecture=args.architecture,
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_heads=args.heads,
        head_dim=args.d_model // args.heads,
        num_encoder_layers=0 if decoder_only else args.layers,
        num_decoder_layers=args.layers,
        dtype=args.dtype,
        moe=moe,
    )


def save_params(path: str, params) -> None:
    import jax  # noqa: PLC0415

    from switch_jax.training import optimizer  # noqa: PLC0415

    leaves = jax.tree.leaves(optimizer.values(params))
    np.savez(path, *[np.asarray(x) for x in jax.device_get(leaves)])


def load_params(path: str, abstract_params, part):
    """Leaves in tree order, placed with the abstract state's shardings."""
    import jax  # noqa: PLC0415

    data = np.load(path)
    arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    specs = jax.tree.leaves(abstract_params)  # ShapeDtypeStructs with shardings
    if len(specs) != len(arrays):
        raise SystemExit(f"{path} does not match the teacher config; rerun --phases=scaling")
    values = [
        jax.device_put(a.astype(s.dtype), s.sharding) for a, s in zip(arrays, specs, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(abstract_params), values)


def run_scaling(args, trainer, train, val, results: dict, flush, seed: int) -> None:
    models = [("dense", None)] + [(f"switch-{e}", e) for e in args.experts]
    teachers = os.path.join(args.out, "teachers")
    os.makedirs(teachers, exist_ok=True)
    for name, experts in models:
        teacher = os.path.join(teachers, f"switch-{experts}-s{seed}.npz")
        if str(seed) in results["runs"].get(name, {}) and (not experts or os.path.exists(teacher)):
            continue  # finished in an earlier invocation
        trainer.setup(name, model_config(args, experts))
        state = trainer.init(name, seed)
        record, state = trainer.run(f"{name} s{seed}", name, state, train[seed], val)
        results["runs"].setdefault(name, {})[str(seed)] = record
        if experts:  # every Switch model: `--phases=distill --distill_experts=E` picks one later
            save_params(teacher, state.params)
        flush()


def run_checks(args, trainer, train, val, results: dict, flush, seed: int) -> None:
    """Tables 2 and 3 at small scale: a bfloat16 router, and the 1.0x (not 0.1x) init scale."""
    import dataclasses  # noqa: PLC0415

    base = model_config(args, args.distill_experts)
    variants = {
        "router-bfloat16": base.replace(moe=dataclasses.replace(base.moe, router_dtype="bfloat16")),
        "init-scale-1.0": base.replace(init_scale=1.0),
    }
    for name, cfg in variants.items():
        if str(seed) in results["checks"].get(name, {}):
            continue
        trainer.setup(name, cfg)
        record, _ = trainer.run(f"{name} s{seed}", name, trainer.init(name, seed), train[seed], val)
        record["against"] = f"switch-{args.distill_experts}"
        results["checks"].setdefault(name, {})[str(seed)] = record
        flush()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_extras(args)
    os.makedirs(args.out, exist_ok=True)
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    path = os.path.join(args.out, "results.json")
    results = {"runs": {}, "distill": {}, "checks": {}, "upcycle": {}}
    if os.path.exists(path):  # resume: what is in results.json is not trained again
        with open(path) as f:
            saved = json.load(f)
        check_same_run(args, saved.get("args", {}), path)
        results.update({k: v for k, v in saved.items() if k in results})
    t_start = time.perf_counter()

    def flush() -> None:
        results["total_s"] = time.perf_counter() - t_start
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)  # a kill mid-write keeps the previous results

    import scaling_data  # noqa: PLC0415 (scripts/, next to this file)
    import scaling_trainer  # noqa: PLC0415

    train, val = scaling_data.load_data(args)
    results["args"] = vars(args)
    trainer = scaling_trainer.Trainer(args)
    import distill_phase  # noqa: PLC0415 (scripts/, next to this file)
    import upcycle_phase  # noqa: PLC0415

    # Seed-major: one complete set (models, then the distillation of that seed's teacher) early.
    for seed in range(args.seeds):
        if "scaling" in args.phases:
            run_scaling(args, trainer, train, val, results, flush, seed)
        if "upcycle" in args.phases:
            upcycle_phase.run(args, trainer, train, val, results, flush, model_config, seed)
        if "checks" in args.phases:
            run_checks(args, trainer, train, val, results, flush, seed)
        if "distill" in args.phases:
            distill_phase.run(
                args, trainer, train, val, results, flush, model_config, load_params, seed
            )
    flush()
    import scaling_report  # noqa: PLC0415

    scaling_report.report(results, args.out, plots=not args.no_plots)
    print(f"total {results['total_s'] / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
