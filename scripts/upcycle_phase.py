"""Phase `upcycle` of reproduce_scaling.py: sparse upcycling vs continuing dense, per seed.

Sparse upcycling (Komatsuzaki et al. 2022) from the scaling phase's dense run of the seed:
  1. the dense model trains --upcycle_at steps again (same init, batches and compiled step, so it
     passes through the same state: its validation loss there is recorded beside the scaling
     run's, and they agree);
  2. `upcycled-E`: the Switch-E model (--upcycle_experts) made from it by training/upcycle.py
     (every expert a copy of its layer's FFN, routers fresh, optimizer fresh as in T5X's MoE
     upcycling) trains on that dense run's remaining batches; `upcycled-E-compensate` the same
     with the copies' outputs scaled by E (UPCYCLE_GATE='compensate'), one run per gate in
     --upcycle_gates.
The other arm, dense continued with its optimizer carried on, is the scaling phase's dense run
itself; both arms cost the same FLOPs per token. The curve's steps and seconds count from the
start of the dense run, so the upcycled run sits on the same axes as the scaling runs.
"""

from __future__ import annotations

from switch_jax.training import upcycle


def run(args, trainer, train, val, results, flush, model_config, seed) -> None:
    at, experts = args.upcycle_at, args.upcycle_experts
    switch_key = f"switch-{experts}"
    names = {
        g: f"upcycled-{experts}" + ("" if g == "keep" else f"-{g}") for g in args.upcycle_gates
    }
    todo = [g for g, n in names.items() if str(seed) not in results["upcycle"].get(n, {})]
    if not todo:
        return  # finished in an earlier invocation
    trainer.setup("dense", model_config(args, None))
    dense, dense_state = trainer.run(
        f"dense to step {at} s{seed}", "dense", trainer.init("dense", seed), train[seed][:at], val
    )
    trainer.setup(switch_key, model_config(args, experts))
    dense_params = upcycle.flat_values(dense_state.params)
    del dense_state
    offset_s = dense["curve"][-1]["train_s"]
    for gate in todo:
        fresh = trainer.init(switch_key, seed)
        params = upcycle.upcycle(dense_params, fresh.params, gate)
        initial = trainer.evaluate(switch_key, params, val)
        name = names[gate]
        print(f"{name} s{seed}: upcycled at step {at}, validation loss {initial:.4f} untrained")
        record, _ = trainer.run(f"{name} s{seed}", switch_key, fresh._replace(params=params),
                                train[seed][at:], val)  # fmt: skip
        for point in record["curve"]:
            point["step"] += at
            point["train_s"] += offset_s
        record["curve"].insert(0, {"step": at, "train_s": offset_s, "val_loss": initial})
        record.update(
            upcycled_at=at,
            dense_at=dense["curve"][-1]["val_loss"],
            initial_val_loss=initial,
            experts=experts,
            gate=gate,
        )
        results["upcycle"].setdefault(name, {})[str(seed)] = record
        flush()
