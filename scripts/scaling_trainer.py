"""The training loop of reproduce_scaling.py over pre-loaded batches, with router statistics."""

from __future__ import annotations

import time

import numpy as np

_ROUTER_KEYS = ("fraction_dropped", "expert_fraction")


class RouterTally:
    """Means over steps of the sparse layers' dropped fraction and per-expert token share, read
    from the train step's metrics (`{stack}/fraction_dropped` [S], `{stack}/expert_fraction`
    [S, E]); nothing for a dense model."""

    def __init__(self):
        self.steps, self.dropped, self.fraction = 0, 0.0, 0.0

    def add(self, metrics: dict) -> None:
        dropped = [
            np.asarray(v, np.float64).reshape(-1)
            for k, v in sorted(metrics.items())
            if k.endswith("fraction_dropped")
        ]
        if not dropped:
            return
        fraction = [
            np.asarray(v, np.float64)
            for k, v in sorted(metrics.items())
            if k.endswith("expert_fraction")
        ]
        self.steps += 1
        self.dropped = self.dropped + np.concatenate(dropped)
        self.fraction = self.fraction + np.concatenate(fraction)

    def loads(self) -> np.ndarray:
        """[sparse layers, E]: each expert's mean share of its layer's tokens x E (1 = even)."""
        if not self.steps:
            return np.zeros((0, 0))
        return self.fraction / self.steps * self.fraction.shape[-1]

    def summary(self) -> dict:
        """Dropped fraction (mean over layers, and its worst layer); busiest / idlest expert."""
        if not self.steps:
            return {"fraction_dropped": 0.0, "dropped_worst_layer": 0.0}
        dropped, loads = self.dropped / self.steps, self.loads()
        return {
            "fraction_dropped": float(dropped.mean()),
            "dropped_worst_layer": float(dropped.max()),
            "load_max": float(loads.max()),
            "load_min": float(loads.min()),
        }


class Trainer:
    """One training setup (steps.setup_training) per key, reused across seeds (only the init
    differs); an in-memory loop over pre-loaded batches, evaluated on pre-loaded validation
    batches (the library trainer reads a seqio task and writes a MODEL_DIR)."""

    def __init__(self, args):
        from switch_jax.config.settings import OptimizerConfig  # noqa: PLC0415
        from switch_jax.parallel import partitioning  # noqa: PLC0415

        self.args = args
        self.part = partitioning.Partitioner((-1, 1, 1))
        self.opt = OptimizerConfig(schedule="constant", learning_rate=args.learning_rate)
        self._setups: dict = {}

    def setup(self, key, model_cfg, objective=None):
        """The setup of `model_cfg` (adapted to the mesh here) under `key`, built once."""
        from switch_jax.training import losses, steps  # noqa: PLC0415

        if key not in self._setups:
            cfg = self.part.adapt_model_config(model_cfg, self.args.batch_size)
            objective = objective or losses.LABELS
            self._setups[key] = steps.setup_training(cfg, self.opt, self.part, objective=objective)
        return self._setups[key]

    def init(self, key, seed: int):
        """A fresh state of seed `seed` (and the objective's start, e.g. from a teacher)."""
        return self._setups[key].init_state(seed)

    def evaluate(self, key, params, val) -> float:
        eval_step = self._setups[key].eval_step
        values = [float(eval_step(params, self.part.shard_batch(b))["cross_entropy"]) for b in val]
        return float(np.mean(values))

    def run(self, name, key, state, batches, val) -> tuple[dict, object]:
        """Train on `batches`, evaluating every --eval_every steps; returns (record, state)."""
        import jax  # noqa: PLC0415

        args, step_fn = self.args, self._setups[key].train_step
        train_s, compile_s, curve = 0.0, 0.0, []
        tally, window = RouterTally(), RouterTally()
        with self.part.activate():
            for step in range(1, len(batches) + 1):
                t0 = time.perf_counter()
                state, m = step_fn(state, self.part.shard_batch(batches[step - 1]))
                loss = float(jax.device_get(m["loss"]))
                dt = time.perf_counter() - t0
                compile_s, train_s = (dt, train_s) if step == 1 else (compile_s, train_s + dt)
                router = jax.device_get({k: v for k, v in m.items() if k.endswith(_ROUTER_KEYS)})
                tally.add(router)
                window.add(router)
                if step % args.eval_every == 0 or step == len(batches):
                    ce = self.evaluate(key, state.params, val)
                    point = {"step": step, "train_s": train_s, "val_loss": ce, "loss": loss}
                    curve.append({**point, **window.summary()})
                    window = RouterTally()
                    print(
                        f"{name} step {step}: loss {loss:.3f} val {ce:.4f} ({train_s:.0f}s)",
                        flush=True,
                    )
        record = {
            "name": name,
            "compile_s": compile_s,
            "step_ms": 1e3 * train_s / max(len(batches) - 1, 1),
            "curve": curve,
            "finite": bool(np.all(np.isfinite([c["val_loss"] for c in curve]))),
            **{f"run_{k}": v for k, v in tally.summary().items()},
            "expert_load": tally.loads().tolist(),
        }
        return record, state
