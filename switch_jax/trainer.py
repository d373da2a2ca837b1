"""The training loop: data -> step -> metrics -> checkpoints, with resume and preemption."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from switch_jax import checkpoints, partitioning, steps
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.info import model_info
from switch_jax.run_config import OptimizerConfig, TrainConfig


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the last committed checkpoint is intact."""


@dataclasses.dataclass
class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

    requested: bool = False

    def install(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts agree on the step through the coordination service.
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def train(
    model_cfg: ModelConfig, run: TrainConfig, opt: OptimizerConfig, *, operative_config: str = ""
) -> dict:
    """Train to `run.train_steps`, resuming from MODEL_DIR; returns the last logged metrics."""
    from switch_jax import metrics as metrics_lib  # noqa: PLC0415 (optional deps: clu)
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow only where data is read)

    partitioner = partitioning.Partitioner(run.mesh_shape, run.dcn_mesh_shape, run.partition_rules)
    model_cfg = partitioner.adapt_model_config(model_cfg, run.batch_size)
    model_dir = _prepare_model_dir(run.model_dir)
    info = model_info(model_cfg, *_lengths(model_cfg, run))
    if jax.process_index() == 0:
        _write_run_files(model_dir, operative_config, info)

    batches = pipeline.make_batches(**_pipeline_args(model_cfg, run, "train"))
    ckpts = checkpoints.Checkpoints(
        os.fspath(model_dir), period=run.checkpoint_period, keep=run.keep_checkpoints
    )
    preemption = _Preemption()
    preemption.install()
    with partitioner.activate():
        setup = steps.setup_training(model_cfg, opt, partitioner, seed=run.seed, z_loss=run.z_loss)
        state, first_step = _initial_state(setup, ckpts, batches, run)
        tokens_per_step = run.batch_size * sum(_lengths(model_cfg, run))
        logger = metrics_lib.MetricsLogger(
            os.fspath(model_dir),
            total_steps=run.train_steps,
            is_chief=jax.process_index() == 0,
            flops_per_step=3 * info.flops_per_sequence * run.batch_size,
        )
        last = {}
        pending = None
        step = first_step
        t0 = time.perf_counter()
        while step < run.train_steps:
            batch = partitioner.shard_batch(next(batches))
            state, step_metrics = setup.train_step(state, batch)
            step += 1
            # Read step N-1's metrics only after dispatching step N: the device stays busy.
            if pending is not None:
                last = _log(logger, *pending, tokens_per_step)
            pending = (step, step_metrics, t0)
            t0 = time.perf_counter()
            preempted = preemption.reached(step)
            if step == run.train_steps or preempted or ckpts.should_save(step):
                last = _log(logger, *pending, tokens_per_step)  # never commit a bad state
                pending = None
                ckpts.save(step, state, iterator=batches, meta=_meta(batches), force=True)
            if step % run.eval_period == 0 or step == run.train_steps:
                logger.log_eval(step, _evaluate(setup, state, model_cfg, run, partitioner))
            if preempted:
                logging.info("preempted: saved step %d, exiting", step)
                break
        if pending is not None:
            last = _log(logger, *pending, tokens_per_step)
        ckpts.close()
        logger.close()
    return last


def evaluate_checkpoint(
    model_cfg: ModelConfig, run: TrainConfig, opt: OptimizerConfig
) -> tuple[int, dict]:
    """Scalar eval metrics of the latest checkpoint in MODEL_DIR (eval capacity factor)."""
    from switch_jax import metrics as metrics_lib  # noqa: PLC0415

    partitioner = partitioning.Partitioner(run.mesh_shape, run.dcn_mesh_shape, run.partition_rules)
    model_cfg = partitioner.adapt_model_config(model_cfg, run.batch_size)
    ckpts = checkpoints.Checkpoints(
        run.model_dir, period=run.checkpoint_period, keep=run.keep_checkpoints
    )
    step = ckpts.latest_step()
    if step is None:
        raise checkpoints.CheckpointError(f"MODEL_DIR={run.model_dir} has no checkpoint")
    with partitioner.activate():
        setup = steps.setup_training(model_cfg, opt, partitioner, seed=run.seed, z_loss=run.z_loss)
        state, _ = ckpts.restore(step, setup.abstract_state)
        results = _evaluate(setup, state, model_cfg, run, partitioner)
    ckpts.close()
    logger = metrics_lib.MetricsLogger(
        run.model_dir,
        total_steps=run.train_steps,
        is_chief=jax.process_index() == 0,
        flops_per_step=0,
    )
    logger.log_eval(step, results)
    logger.close()
    return step, {k: float(v) for k, v in results.items() if np.ndim(v) == 0}


def _initial_state(setup, ckpts, batches, run: TrainConfig):
    latest = ckpts.latest_step()
    if latest is not None:
        state, meta = ckpts.restore(latest, setup.abstract_state, iterator=batches)
        logging.info("resumed from step %d", latest)
        return state, int(meta["step"])
    state = setup.init_state()
    if run.init_checkpoint:
        params = checkpoints.restore_params(run.init_checkpoint, setup.abstract_state.params)
        state = state._replace(params=params)
    return state, 0


def _log(logger, step, step_metrics, t0, tokens_per_step) -> dict:
    host = jax.device_get(step_metrics)
    loss = float(np.asarray(host["loss"]))
    if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at step {step}; the last committed checkpoint is intact"
        )
    step_time = time.perf_counter() - t0
    logger.log_train(step, host, step_time=step_time, tokens=tokens_per_step)
    return host


def _evaluate(setup, state, model_cfg, run: TrainConfig, partitioner) -> dict:
    from switch_jax.data import pipeline  # noqa: PLC0415

    batches = pipeline.make_batches(**_pipeline_args(model_cfg, run, "validation"))
    totals: dict = {}
    for _ in range(run.eval_steps):
        host = jax.device_get(setup.eval_step(state.params, partitioner.shard_batch(next(batches))))
        for name, value in host.items():
            totals.setdefault(name, []).append(np.asarray(value))
    return {name: np.mean(values, axis=0) for name, values in totals.items()}


def _pipeline_args(model_cfg: ModelConfig, run: TrainConfig, split: str) -> dict:
    train = split == "train"
    return dict(
        task_or_mixture=run.mixture_or_task_name,
        split=split,
        feature_lengths=run.feature_lengths,
        batch_size=run.batch_size // jax.process_count(),
        architecture=model_cfg.architecture,
        seed=run.seed,
        shard_index=jax.process_index(),
        num_shards=jax.process_count(),
        shuffle=train,
        repeat=True,
        tfds_data_dir=run.tfds_data_dir,
    )


def _lengths(model_cfg: ModelConfig, run: TrainConfig) -> tuple[int, int]:
    lengths = run.feature_lengths
    if model_cfg.is_encoder_decoder:
        return lengths.get("inputs", 0), lengths["targets"]
    return 0, lengths["targets"]


def _meta(batches) -> dict:
    return {"batches_consumed": int(getattr(batches, "batches_consumed", -1))}


def _prepare_model_dir(model_dir: str) -> epath.Path:
    """Fail before any step if MODEL_DIR cannot hold checkpoints."""
    if not model_dir:
        raise ConfigError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    path = epath.Path(model_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"MODEL_DIR={model_dir} is not writable: {e.strerror or e}") from None
    return path


def _write_run_files(model_dir: epath.Path, operative_config: str, info) -> None:
    if operative_config:
        (model_dir / "config.gin").write_text(operative_config)
    lines = [
        f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v:.4g}" for k, v in info.as_dict().items()
    ]
    (model_dir / "model-info.txt").write_text("\n".join(lines) + "\n")
