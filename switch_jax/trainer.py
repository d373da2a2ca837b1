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
    """Train to `run.train_steps`, resuming from MODEL_DIR; returns the last logged metrics.

    Every check that can fail on user input (mesh, MODEL_DIR, a conflicting earlier run, disk
    space) runs before the first step; a failure never deletes or rewrites a checkpoint.
    """
    partitioner = partitioning.Partitioner(run.mesh_shape, run.dcn_mesh_shape, run.partition_rules)
    settings = checkpoints.run_settings(model_cfg, run, opt)
    model_cfg = partitioner.adapt_model_config(model_cfg, run.batch_size)
    model_dir = _prepare_model_dir(run.model_dir)
    ckpts = checkpoints.Checkpoints(
        os.fspath(model_dir), period=run.checkpoint_period, keep=run.keep_checkpoints
    )
    try:
        latest = ckpts.latest_step()
        if latest is not None:  # before config.gin is overwritten: refuse another run's dir
            checkpoints.check_same_run(ckpts.saved_settings(latest), settings, run.model_dir)
        info = model_info(model_cfg, *_lengths(model_cfg, run))
        if jax.process_index() == 0:
            _write_run_files(model_dir, operative_config, info)
        with partitioner.activate():
            setup = steps.setup_training(
                model_cfg,
                opt,
                partitioner,
                seed=run.seed,
                z_loss=run.z_loss,
                skip_nonfinite=run.skip_nonfinite_updates,
            )
            ckpts.check_free_space(setup.abstract_state, run.keep_checkpoints)
        return _run(model_cfg, run, partitioner, setup, ckpts, info, settings)
    except NonFiniteLossError as e:
        ckpts.wait()
        raise NonFiniteLossError(f"{e}; last committed checkpoint: {ckpts.latest_step()}") from None
    finally:
        ckpts.close()  # waits for an in-flight save: the last good checkpoint gets committed


def _run(model_cfg, run: TrainConfig, partitioner, setup, ckpts, info, settings) -> dict:
    from switch_jax import metrics as metrics_lib  # noqa: PLC0415 (optional deps: clu)
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow only where data is read)

    batches = pipeline.make_batches(**_pipeline_args(model_cfg, run, "train"))
    preemption = _Preemption()
    preemption.install()
    # Created outside the mesh context: it may time a single-device matmul for the CPU peak.
    logger = metrics_lib.MetricsLogger(
        run.model_dir,
        total_steps=run.train_steps,
        is_chief=jax.process_index() == 0,
        flops_per_step=3 * info.flops_per_sequence * run.batch_size,
        start_step=ckpts.latest_step(),
        moe_layers=metrics_lib.moe_layer_ids(model_cfg),
    )
    with partitioner.activate():
        state, first_step = _initial_state(setup, ckpts, batches, run)
        loop = _Loop(run, logger, tokens=run.batch_size * sum(_lengths(model_cfg, run)))
        eval_dataset = None
        step = first_step
        while step < run.train_steps:
            state, step_metrics = setup.train_step(state, partitioner.shard_batch(next(batches)))
            step += 1
            # Step N-1's metrics are read only after step N is dispatched: the device stays busy.
            loop.dispatched(step, step_metrics)
            preempted = preemption.reached(step)
            if step == run.train_steps or preempted or step % run.checkpoint_period == 0:
                loop.flush()  # a non-finite loss raises here, before anything is committed
                ckpts.save(step, state, iterator=batches, meta=_meta(batches, settings), force=True)
            if preempted:
                # No eval: the grace period before SIGKILL is short, the save must finish first.
                print(f"preempted: saved step {step}, exiting", flush=True)
                break
            if step % run.eval_period == 0 or step == run.train_steps:
                eval_dataset = eval_dataset or _eval_dataset(model_cfg, run)
                results = _evaluate(setup, state, run, partitioner, eval_dataset)
                logger.log_eval(step, results)
        loop.flush()
    logger.close()
    return loop.last


class _Loop:
    """Host side of the loop: finiteness check every step, logging every LOG_PERIOD steps."""

    def __init__(self, run: TrainConfig, logger, tokens: int):
        self.run, self.logger, self.tokens = run, logger, tokens
        self.pending = None
        self.last: dict = {}
        self.skipped = 0
        self.t0 = time.perf_counter()

    def dispatched(self, step: int, step_metrics) -> None:
        self.flush()
        now = time.perf_counter()
        self.pending = (step, step_metrics, now - self.t0)
        self.t0 = now

    def flush(self) -> None:
        if self.pending is None:
            return
        step, step_metrics, step_time = self.pending
        self.pending = None
        loss, grad_norm = (float(jax.device_get(step_metrics[k])) for k in ("loss", "grad_norm"))
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            if self.run.skip_nonfinite_updates:  # the step already kept the old state in-graph
                self.skipped += 1
                logging.warning("step %d: non-finite loss/grad, update skipped", step)
            else:
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not np.isfinite(loss) else 'gradient'} (loss "
                    f"{loss}, grad_norm {grad_norm}) at step {step}; nothing after the last "
                    f"committed checkpoint was saved (lower LEARNING_RATE or set "
                    f"TrainConfig.skip_nonfinite_updates=True)"
                )
        period = self.run.log_period
        if step % period == 0 or step == 1 or step == self.run.train_steps:
            self.last = jax.device_get(step_metrics)
            self.logger.log_train(step, self.last, step_time=step_time, tokens=self.tokens)


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
        results = _evaluate(setup, state, run, partitioner, _eval_dataset(model_cfg, run))
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
        print(f"resumed from step {latest} ({ckpts.directory})", flush=True)
        return state, int(meta["step"])
    # A wrong init_checkpoint is refused before the (slow) initialisation.
    params = None
    if run.init_checkpoint:
        params = checkpoints.restore_params(run.init_checkpoint, setup.abstract_state.params)
    state = setup.init_state()
    return (state if params is None else state._replace(params=params)), 0


def _evaluate(setup, state, run: TrainConfig, partitioner, dataset) -> dict:
    """Mean metrics over the first `eval_steps` validation batches (the same ones every time)."""
    batches = iter(dataset)
    totals: dict = {}
    for _ in range(run.eval_steps):
        host = {k: v.numpy() for k, v in next(batches).items()}
        out = jax.device_get(setup.eval_step(state.params, partitioner.shard_batch(host)))
        for name, value in out.items():
            totals.setdefault(name, []).append(np.asarray(value))
    return {name: np.mean(values, axis=0) for name, values in totals.items()}


def _eval_dataset(model_cfg, run: TrainConfig):
    """The validation tf.data pipeline, built once; each evaluation iterates it afresh."""
    from switch_jax.data import pipeline  # noqa: PLC0415

    return pipeline.make_dataset(**_pipeline_args(model_cfg, run, "validation"))


def _pipeline_args(model_cfg: ModelConfig, run: TrainConfig, split: str) -> dict:
    train = split == "train"
    options = {"tfds_data_dir": run.tfds_data_dir} if run.tfds_data_dir else {}
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
        **options,
    )


def _lengths(model_cfg: ModelConfig, run: TrainConfig) -> tuple[int, int]:
    lengths = run.feature_lengths
    if model_cfg.is_encoder_decoder:
        return lengths.get("inputs", 0), lengths["targets"]
    return 0, lengths["targets"]


def _meta(batches, settings: dict) -> dict:
    # The settings let a later start refuse a MODEL_DIR that holds a different run.
    return {"batches_consumed": int(getattr(batches, "batches_consumed", -1)), "settings": settings}


def _prepare_model_dir(model_dir: str) -> epath.Path:
    """Fail before any step if MODEL_DIR cannot hold checkpoints."""
    if not model_dir:
        raise ConfigError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    path = epath.Path(model_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"MODEL_DIR={model_dir} is a file, not a directory; choose another path")
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
        _write_atomic(model_dir / "config.gin", operative_config)
    lines = [
        f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v:.4g}" for k, v in info.as_dict().items()
    ]
    _write_atomic(model_dir / "model-info.txt", "\n".join(lines) + "\n")


def _write_atomic(path: epath.Path, text: str) -> None:
    """A kill mid-write leaves the old file, never a truncated one (rename is atomic locally)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
