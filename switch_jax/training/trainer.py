"""The training loop: data -> step -> metrics -> checkpoints, with resume and preemption."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from switch_jax.config.settings import Configs, TrainConfig
from switch_jax.decode import evaluation
from switch_jax.models.config import ConfigError
from switch_jax.parallel import compile_cache
from switch_jax.report import console
from switch_jax.store import checkpoints, run_settings
from switch_jax.store import lease as lease_lib
from switch_jax.store import model_dir as model_dir_lib
from switch_jax.training import build, losses, upcycle


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the last committed checkpoint is intact."""


@dataclasses.dataclass
class _Preemption:
    """SIGTERM or a first Ctrl-C sets a flag; the loop saves at the next step boundary and exits
    cleanly. A second Ctrl-C exits at once (the last committed checkpoint stays intact)."""

    requested: bool = False
    reason: str = ""

    def install(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, lambda *_: self._request("preempted"))
            signal.signal(signal.SIGINT, self._on_sigint)

    def _request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason

    def _on_sigint(self, *_) -> None:
        if self.reason == "interrupted":
            print("\nCtrl-C again: exiting now, without saving", flush=True)
            os._exit(130)  # Orbax's save threads would otherwise be awaited
        self._request("interrupted")
        print(
            "\nCtrl-C: saving at the next step, then exiting (Ctrl-C again: exit now)", flush=True
        )

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts agree on the step through the coordination service.
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def train(configs: Configs, *, operative_config: str = "") -> dict:
    """Train to TRAIN_STEPS, resuming from MODEL_DIR; returns the last logged metrics.

    Every check that can fail on user input (mesh, MODEL_DIR, a conflicting earlier run, disk
    space) runs before the first step; a failure never deletes or rewrites a checkpoint.
    """
    model_dir = model_dir_lib.ensure_writable(configs.checkpoint.model_dir)
    # Before Orbax is opened: it deletes unfinished saves, which may be a live trainer's.
    lease = lease_lib.acquire_for_job(os.fspath(model_dir))
    summary: list[str] = []
    try:
        # With runs/distill.gin the Run's train step runs the teacher (build_run reads it).
        run = build.build_run(configs)
        # After a takeover by watching, the old holder may be a stalled process with an async
        # save still in flight: leave its temporary directories alone (latest_step ignores them).
        # An async save commits only while the lease is ours: a holder that stalls mid-save and
        # loses MODEL_DIR to another trainer must neither rename its save nor delete old ones.
        ckpts = run.checkpoints(
            cleanup_tmp=lease is None or not lease.predecessor_may_live,
            commit_guard=lease.check if lease is not None else None,
        )
        progress = {"step": None}
        try:
            latest = ckpts.latest_step()
            if latest is not None:  # before config.gin is overwritten: refuse another run's dir
                run_settings.check_same_run(
                    ckpts.saved_settings(latest), run.settings, configs.checkpoint.model_dir
                )
            if jax.process_index() == 0:
                moe = run.model_cfg.moe  # its dispatch is 'auto' resolved for the mesh
                dispatch = None
                if moe is not None:
                    rows = moe.dispatch in ("sorted", "dropless")  # their experts' grouped matmul
                    dispatch = f"{moe.dispatch}:{moe.grouped_matmul}" if rows else moe.dispatch
                model_dir_lib.write_run_files(
                    model_dir, operative_config, run.info, dispatch=dispatch
                )
            ckpts.check_free_space(run.setup.abstract_state, configs.checkpoint.keep)
            last_metrics = _train_loop(run, ckpts, lease, progress, summary)
        except NonFiniteLossError as e:
            ckpts.wait()
            last = ckpts.latest_step()
            raise NonFiniteLossError(f"{e}; last committed checkpoint: {last}") from None
        except Exception as e:
            if checkpoints.is_out_of_space(e):
                raise _out_of_space(ckpts, configs, progress["step"]) from None
            raise
        finally:
            try:
                ckpts.close()  # waits for an in-flight save: the last good one gets committed
            except Exception as e:
                if not checkpoints.is_out_of_space(e):
                    raise
                raise _out_of_space(ckpts, configs, progress["step"]) from None
    finally:
        if lease is not None:
            lease.release()
    # Last: the lease is free, so the printed command works at once, and the process exits
    # right after it.
    if summary:
        print("\n".join(summary), flush=True)
    return last_metrics


def _out_of_space(ckpts, configs: Configs, step: int | None) -> checkpoints.CheckpointError:
    """One line: where, which step was lost, and which checkpoint a rerun resumes from."""
    committed = ckpts.committed_steps()
    last = committed[-1] if committed else None
    failed = next((s for s in ckpts.attempted if last is None or s > last), step)
    intact = f"step {last} ({ckpts.step_dir(last)})" if last is not None else "none"
    return checkpoints.CheckpointError(
        f"out of space in MODEL_DIR={configs.checkpoint.model_dir} at step {failed} (not saved); "
        f"last intact checkpoint: {intact}; free space and run the same command to resume"
    )


def _train_loop(run: build.Run, ckpts, lease, progress: dict, summary: list[str]) -> dict:
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow only where data is read)
    from switch_jax.report import metrics as metrics_lib  # noqa: PLC0415 (optional deps: clu)
    from switch_jax.report import wandb_log  # noqa: PLC0415

    train_cfg, ckpt_cfg = run.configs.train, run.configs.checkpoint
    chief = jax.process_index() == 0
    started = time.perf_counter()
    resumed_from = ckpts.latest_step()
    batches = pipeline.make_batches(**run.pipeline_args("train"))
    preemption = _Preemption()
    preemption.install()
    # Created outside the mesh context: it may time a single-device matmul for the CPU peak.
    logger = metrics_lib.MetricsLogger(
        ckpt_cfg.model_dir,
        total_steps=train_cfg.train_steps,
        is_chief=chief,
        flops_per_step=metrics_lib.train_flops_per_step(run.info, run.configs.data.batch_size),
        start_step=resumed_from,
        moe_layers=metrics_lib.moe_layer_ids(run.model_cfg),
        wandb=wandb_log.start(train_cfg, ckpt_cfg.model_dir, settings=run.settings, is_chief=chief),
        dead_experts=(train_cfg.dead_expert_threshold, train_cfg.dead_expert_logs),
    )
    profiler = _Profiler(train_cfg.profile_steps, ckpt_cfg.model_dir)
    task_eval = evaluation.TaskEvaluator(run)  # decodes + task metrics, for tasks that have them
    with run.partitioner.activate():
        state, first_step = _initial_state(run, ckpts, batches)
        if chief:  # only now: a start refused above must not have announced a run
            header = console.header_lines(run, ckpt_cfg.model_dir, resumed_from)
            print("\n".join(header), flush=True)
        loop = _Loop(train_cfg, logger, tokens=run.tokens_per_step)
        eval_dataset = None
        step = first_step
        while step < train_cfg.train_steps:
            profiler.before(step + 1)
            compiling = step == first_step and chief
            if compiling:
                print("compiling the train step…", end=" ", flush=True)
            t0, cached = time.perf_counter(), compile_cache.hits()
            state, step_metrics = run.setup.train_step(state, run.device_batch(next(batches)))
            if compiling:  # the first call returns once compiled; the step itself runs async
                took = console.duration(time.perf_counter() - t0)
                source = " (from the compile cache)" if compile_cache.hits() > cached else ""
                print(f"done in {took}{source}", flush=True)
            step += 1
            progress["step"] = step
            # Step N-1's metrics are read only after step N is dispatched: the device stays busy.
            loop.dispatched(step, step_metrics)
            profiler.after(step, step_metrics)
            preempted = preemption.reached(step)
            last = step == train_cfg.train_steps
            if last or preempted or step % ckpt_cfg.period == 0:
                loop.flush()  # a non-finite loss raises here, before anything is committed
                if lease is not None:
                    lease.check()  # never write beside a trainer that took MODEL_DIR over
                meta = _meta(batches, run.settings)
                # Off the period, a Ctrl-C / preemption save is kept beside the KEEP regular ones.
                extra = preempted and not last and step % ckpt_cfg.period != 0
                ckpts.save(step, state, iterator=batches, meta=meta, force=True, extra=extra)
            if preempted:
                # No eval: the grace period before SIGKILL is short, the save must finish first.
                print(f"{preemption.reason or 'preempted'}: saved step {step}, exiting", flush=True)
                break
            if train_cfg.eval_steps and (step % train_cfg.eval_period == 0 or last):
                eval_dataset = eval_dataset or _eval_dataset(run)
                results = _evaluate(run, state.params, eval_dataset)
                logger.log_eval(step, {**results, **task_eval(state.params, step)})
        loop.flush()
    profiler.close()
    logger.close()
    ckpts.wait()  # the summary names a committed checkpoint; every process (Orbax may sync)
    if chief:
        summary += console.summary_lines(
            first_step=first_step,
            step=step,
            total_steps=train_cfg.train_steps,
            elapsed_s=time.perf_counter() - started,
            last_checkpoint=ckpts.latest_step(),
            checkpoint_dir=os.fspath(ckpts.directory),
            model_dir=ckpt_cfg.model_dir,
            stopped=preemption.reason or None,
        )
    return loop.last


class _Profiler:
    """A jax.profiler trace of steps [first, last] into MODEL_DIR/train/profile (TensorBoard's
    profile tab reads it); process 0 only."""

    def __init__(self, steps: tuple[int, int] | None, model_dir: str):
        self.steps = steps if jax.process_index() == 0 else None
        self.logdir = os.fspath(model_dir_lib.profile_dir(model_dir))
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, step_metrics) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(step_metrics)  # the trace must hold the whole last step
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.steps[0]}-{self.steps[1]}: {self.logdir}", flush=True)


class _Loop:
    """Host side of the loop: finiteness check every step, logging every LOG_PERIOD steps."""

    def __init__(self, train_cfg: TrainConfig, logger, tokens: int):
        self.train_cfg, self.logger, self.tokens = train_cfg, logger, tokens
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
            if (
                self.train_cfg.skip_nonfinite_updates
            ):  # the step already kept the old state in-graph
                self.skipped += 1
                logging.warning("step %d: non-finite loss/grad, update skipped", step)
            else:
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not np.isfinite(loss) else 'gradient'} (loss "
                    f"{loss}, grad_norm {grad_norm}) at step {step}; nothing after the last "
                    f"committed checkpoint was saved (lower LEARNING_RATE or set "
                    f"TrainConfig.skip_nonfinite_updates=True)"
                )
        self.logger.step_done(step)
        period = self.train_cfg.log_period
        if step % period == 0 or step == 1 or step == self.train_cfg.train_steps:
            self.last = jax.device_get(step_metrics)
            self.logger.log_train(step, self.last, step_time=step_time, tokens=self.tokens)


def evaluate_checkpoint(configs: Configs) -> tuple[int, dict]:
    """Scalar eval metrics of the latest checkpoint in MODEL_DIR (see evaluate_checkpoints)."""
    return evaluate_checkpoints(configs, "latest")[-1]


def evaluate_checkpoints(configs: Configs, which: str | int = "latest") -> list[tuple[int, dict]]:
    """Teacher-forced loss / accuracy (eval capacity factor) and, for tasks with metrics, the
    decoded task metrics of checkpoint `which` ('latest', 'all' or a step) of MODEL_DIR;
    written to MODEL_DIR/eval. Returns [(step, scalar metrics), ...] in step order."""
    from switch_jax.report import metrics as metrics_lib  # noqa: PLC0415

    # The label objective: evaluating a distilled student needs no teacher.
    run = build.build_run(configs, objective=losses.LABELS)
    model_dir = configs.checkpoint.model_dir
    ckpts = run.checkpoints()
    logger = None  # created at the first result: a refused eval leaves no event files behind
    task_eval, out = evaluation.TaskEvaluator(run), []
    try:
        dataset = _eval_dataset(run)
        for step in checkpoints.select_steps(ckpts, which):
            with run.partitioner.activate():
                # Parameters only: the optimizer state is not needed, and a converted MODEL_DIR
                # (switch_jax.convert) holds none.
                params = checkpoints.restore_params(
                    os.fspath(ckpts.step_dir(step)), run.abstract_params
                )
                results = {**_evaluate(run, params, dataset), **task_eval(params, step)}
            logger = logger or metrics_lib.MetricsLogger(
                model_dir,
                total_steps=configs.train.train_steps,
                is_chief=jax.process_index() == 0,
                flops_per_step=0,
                moe_layers=metrics_lib.moe_layer_ids(run.model_cfg),
            )
            logger.log_eval(step, results)
            scalars = {k: metrics_lib.scalar(k, v) for k, v in results.items() if np.ndim(v) == 0}
            out.append((step, scalars))
    finally:
        ckpts.close()
        if logger is not None:
            logger.close()
    return out


def _initial_state(run: build.Run, ckpts, batches):
    setup = run.setup
    latest = ckpts.latest_step()
    if latest is not None:
        state, meta = ckpts.restore(latest, setup.abstract_state, iterator=batches)
        print(f"resumed from step {latest} ({ckpts.directory})", flush=True)
        return state, int(meta["step"])
    # A wrong init_checkpoint is refused before the (slow) initialisation.
    params = None
    init_checkpoint = run.configs.checkpoint.init_checkpoint
    if init_checkpoint and run.configs.checkpoint.init_restore == "all":
        return _restore_all(run, init_checkpoint)
    if init_checkpoint and run.configs.checkpoint.init_restore == "upcycle":
        gate = run.configs.checkpoint.upcycle_gate
        state = setup.init_state()
        state = state._replace(params=upcycle.upcycled_params(init_checkpoint, state.params, gate))
        print(
            f"upcycled from {init_checkpoint}: experts copy its FFNs, routers fresh, gate {gate}",
            flush=True,
        )
        return state, 0
    if init_checkpoint:
        params = checkpoints.restore_params(init_checkpoint, run.abstract_params)
        source = model_dir_lib.resolve_step_dir(init_checkpoint)
        print(
            f"initialised from {init_checkpoint} step {source.name} (params; fresh optimizer, "
            f"step 0)",
            flush=True,
        )
    state = setup.init_state()
    return (state if params is None else state._replace(params=params)), 0


def _restore_all(run: build.Run, init_checkpoint: str):
    """T5X's default fine-tuning start: parameters, optimizer state and step continue."""
    state = checkpoints.restore_state(init_checkpoint, run.setup.abstract_state)
    step, total = int(jax.device_get(state.step)), run.configs.train.train_steps
    if total <= step:
        raise ConfigError(
            f"INIT_RESTORE='all' continues from step {step} of {init_checkpoint}, but "
            f"TRAIN_STEPS={total} is not beyond it: set TRAIN_STEPS={step} + the fine-tuning "
            f"steps, or INIT_RESTORE='params' to start at step 0"
        )
    print(f"initialised from step {step} of {init_checkpoint} (params + optimizer)", flush=True)
    return state, step


def _evaluate(run: build.Run, params, dataset) -> dict:
    """Mean metrics over the first EVAL_STEPS validation batches (the same ones every time)."""
    batches = iter(dataset)
    totals: dict = {}
    for _ in range(run.configs.train.eval_steps):
        host = {k: v.numpy() for k, v in next(batches).items()}
        out = jax.device_get(run.setup.eval_step(params, run.device_batch(host)))
        for name, value in out.items():
            totals.setdefault(name, []).append(np.asarray(value))
    # Counts (num_tokens) add up over the batches; a mean of them would read 917.2 tokens.
    count = ("num_tokens",)
    return {n: (np.sum if n in count else np.mean)(v, axis=0) for n, v in totals.items()}


def _eval_dataset(run: build.Run):
    """The validation tf.data pipeline, built once; each evaluation iterates it afresh."""
    from switch_jax.data import pipeline  # noqa: PLC0415

    return pipeline.make_dataset(**run.pipeline_args("validation"))


def _meta(batches, settings: dict) -> dict:
    # The settings let a later start refuse a MODEL_DIR that holds a different run.
    return {"batches_consumed": int(getattr(batches, "batches_consumed", -1)), "settings": settings}
