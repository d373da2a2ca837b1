"""Training metrics: TensorBoard (clu), metrics.jsonl, a progress line with ETA, MFU, MoE health.

Usage (the trainer; only process 0 writes files)::

    logger = MetricsLogger(model_dir, total_steps=run.train_steps,
                           is_chief=jax.process_index() == 0,
                           flops_per_step=train_flops_per_step(info, run.batch_size),
                           start_step=restored_step, moe_layers=moe_layer_ids(model_cfg))
    logger.log_train(step, host_metrics, step_time=seconds_per_step, tokens=tokens_per_step)
    logger.log_eval(step, host_eval_metrics)
    logger.close()

`host_metrics` is a dict of host values (numpy / Python numbers, e.g. `jax.device_get` of the
step's metrics). Scalars are logged as they are (loss, cross_entropy, aux_loss, z_loss,
router_z_loss, accuracy, learning_rate, grad_norm, ...). Router statistics are either flat
`{stack}/{field}` keys (what steps.py returns: `encoder/fraction_dropped` [S], ...) or
`moe: {stack: RouterStats or dict}`, arrays with a leading sparse-layer axis; they become
`moe/{stack}/layer_{i}/{field}` scalars (i = the layer's index in its stack, when `moe_layers`
is given, else its order among the sparse layers), `expert_fraction` [S, E] becomes per-layer
`expert_usage_max` / `expert_usage_min` (load of the busiest / idlest expert, 1.0 = uniform) and
the fraction list itself in the JSON line, plus `moe/{field}` means over all layers.

Files: MODEL_DIR/train/metrics.jsonl (one JSON object per logged step) and TensorBoard events in
MODEL_DIR/train and MODEL_DIR/eval (+ eval/metrics.jsonl). TensorBoard goes through clu's
SummaryWriter when clu imports (it needs TensorFlow), else through tensorboard's own event writer
(GPU images without TF), else it is skipped with one warning. A resumed run passes `start_step`:
JSON lines after it (logged after the checkpoint that was restored) are dropped so that the file
reads as one uninterrupted run.

MFU = flops_per_step / step_time / peak, where flops_per_step counts forward + backward
(3 x the forward FLOPs of models/size.py) and peak is the dense bf16 peak of all devices
(report/hardware.py's `peak_flops`; on CPU, a float32 matmul timed once in this process).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from switch_jax.report import hardware
from switch_jax.report.console import DeadExperts, Eta, duration
from switch_jax.store import model_dir as model_dir_lib

STACKS = ("encoder", "decoder")  # the prefixes of router statistics in a step's metrics
COUNTS = ("num_tokens",)  # metrics that count things: written and printed as integers


def train_flops_per_step(info: Any, batch_size: int) -> float:
    """Forward + backward FLOPs of one step: 3 x models/size.py's forward FLOPs per sequence."""
    return 3.0 * info.flops_per_sequence * batch_size


def mfu(flops_per_step: float, step_time: float, peak: float) -> float:
    """Model FLOPs utilisation of one step, in [0, 1]."""
    return flops_per_step / step_time / peak if step_time > 0 and peak else 0.0


# --------------------------------------------------------------------------- flattening
def flatten_moe(
    moe: Mapping[str, Any], moe_layers: Mapping[str, list[int]] | None = None
) -> tuple[dict[str, float], dict[str, list]]:
    """Per-layer router statistics -> (named scalars, named lists for the JSON line)."""
    scalars: dict[str, float] = {}
    lists: dict[str, list] = {}
    per_field: dict[str, list[float]] = {}
    loads: list[tuple[float, float]] = []
    for stack, stats in moe.items():
        if stats is None:
            continue
        fields = stats._asdict() if hasattr(stats, "_asdict") else dict(stats)
        for field, value in fields.items():
            value = np.asarray(value, np.float64)
            if value.ndim == 0:  # a field that is not per layer
                scalars[f"moe/{stack}/{field}"] = float(value)
                continue
            ids = (moe_layers or {}).get(stack) or list(range(value.shape[0]))
            for i, layer_value in zip(ids, value, strict=False):
                prefix = f"moe/{stack}/layer_{i}"
                if layer_value.ndim == 0:
                    scalars[f"{prefix}/{field}"] = float(layer_value)
                    per_field.setdefault(field, []).append(float(layer_value))
                    continue
                lists[f"{prefix}/{field}"] = [round(float(v), 6) for v in layer_value]
                if field == "expert_fraction":
                    E = layer_value.size
                    usage = (float(layer_value.max() * E), float(layer_value.min() * E))
                    scalars[f"{prefix}/expert_usage_max"] = usage[0]
                    scalars[f"{prefix}/expert_usage_min"] = usage[1]
                    loads.append(usage)
    for field, values in per_field.items():
        scalars[f"moe/{field}"] = float(np.mean(values))
    if loads:  # the worst layer, for the progress line
        scalars["moe/expert_usage_max"] = max(hi for hi, _ in loads)
        scalars["moe/expert_usage_min"] = min(lo for _, lo in loads)
    return scalars, lists


def flatten_metrics(
    metrics: Mapping[str, Any], moe_layers: Mapping[str, list[int]] | None = None
) -> tuple[dict[str, float], dict[str, list]]:
    """Top-level scalars plus flattened router statistics; other arrays go to the lists.

    Router statistics are read from `moe: {stack: stats}` or, as steps.py returns them, from
    flat `{stack}/{field}` keys (stack 'encoder' or 'decoder') with a leading layer axis.
    """
    moe: dict[str, dict] = {}
    for stack, stats in (metrics.get("moe") or {}).items():
        if stats is not None:
            moe[stack] = stats._asdict() if hasattr(stats, "_asdict") else dict(stats)
    scalars: dict[str, float] = {}
    lists: dict[str, list] = {}
    for name, value in metrics.items():
        stack, sep, field = name.partition("/")
        if name == "moe":
            continue
        if sep and stack in STACKS:
            moe.setdefault(stack, {})[field] = value
        elif isinstance(value, Mapping):
            s, lst = flatten_metrics(value, moe_layers)
            scalars.update({f"{name}/{k}": v for k, v in s.items()})
            lists.update({f"{name}/{k}": v for k, v in lst.items()})
        else:
            array = np.asarray(value)
            if array.size == 1:
                scalars[name] = scalar(name, array)
            else:
                lists[name] = np.asarray(array, np.float64).tolist()
    s, lst = flatten_moe(moe, moe_layers)
    return {**scalars, **s}, {**lists, **lst}


def scalar(name: str, value: Any) -> float | int:
    """A host value as a Python number: an int for counts (num_tokens), else a float."""
    number = float(np.asarray(value).reshape(()))
    return int(round(number)) if name.rsplit("/", 1)[-1] in COUNTS else number


def moe_layer_ids(cfg: Any) -> dict[str, list[int]]:
    """{'encoder': [1, 3, ...], 'decoder': [...]}: the sparse layers of each stack of a config."""
    names = ("encoder", "decoder") if cfg.is_encoder_decoder else ("decoder",)
    return {
        name: [i for i in range(depth) if cfg.is_sparse(i)]
        for name, depth in zip(names, cfg.stack_depths(), strict=True)
    }


# --------------------------------------------------------------------------- writers
class _TensorBoard:
    """write_scalars(step, dict) through clu, or tensorboard's own writer without TensorFlow."""

    def __init__(self, logdir: str):
        self._clu = self._raw = None
        try:
            from clu import metric_writers

            # Not create_default_writer: its LoggingWriter would repeat every scalar in the log.
            self._clu = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(logdir)])
            return
        except ImportError as e:
            reason = str(e)
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._raw = EventFileWriter(logdir)
            logging.info("clu unavailable (%s): tensorboard's event writer in use", reason)
        except ImportError:
            logging.warning("neither clu nor tensorboard importable: no TensorBoard events")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._clu is not None:
            self._clu.write_scalars(step, dict(scalars))
        elif self._raw is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
            summary = summary_pb2.Summary(value=values)
            self._raw.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        for writer in (self._clu, self._raw):
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        for writer in (self._clu, self._raw):
            if writer is not None:
                writer.close()


class _JsonLines:
    """MODEL_DIR/{train,eval}/metrics.jsonl. Local files are appended to; object stores (gs://)
    cannot append, so there the file is rewritten from memory at most once a minute and on
    close. `start_step` drops lines logged after the checkpoint a resumed run restored."""

    def __init__(self, path: str, start_step: int | None):
        self.path = epath.Path(path)
        self.remote = "://" in path
        self.lines: list[str] = []
        self._written = 0.0
        kept = _read_lines(self.path, start_step) if start_step is not None else None
        if self.remote:
            self.lines = kept if kept is not None else _read_lines(self.path, None)
        elif kept is not None:
            self.path.write_text("".join(kept))
        self._file = None if self.remote else open(path, "a")  # noqa: SIM115

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self.lines.append(line + "\n")
        if time.monotonic() - self._written > 60:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            self.path.write_text("".join(self.lines))
            self._written = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


def _read_lines(path: epath.Path, last_step: int | None) -> list[str]:
    """Complete JSON lines of `path` (of steps <= last_step, if given)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if last_step is None or row.get("step", 0) <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLogger:
    """Writes train/eval metrics of process 0: TensorBoard, JSON lines, console progress."""

    def __init__(
        self,
        model_dir: str,
        *,
        total_steps: int,
        is_chief: bool = True,
        flops_per_step: float | None = None,
        peak: float | None = None,
        start_step: int | None = None,
        moe_layers: Mapping[str, list[int]] | None = None,
        console: bool = True,
        wandb: Any = None,
        dead_experts: tuple[float, int] | None = None,
    ):
        self.total_steps = total_steps
        self.is_chief = is_chief
        self.flops_per_step = flops_per_step
        self.moe_layers = moe_layers
        self.console = console and is_chief
        self._peak = (
            peak if peak is not None else (hardware.peak_flops() if flops_per_step else None)
        )
        # A CPU's peak is a matmul timed once at start-up: on a shared host the same run read
        # 67 % in one process and 23 % in the next, so the console leaves it out (the JSON and
        # TensorBoard rows keep it).
        self._show_mfu = peak is not None or not hardware.host_is_cpu()
        self.eta = Eta(total_steps)
        self.wandb = wandb  # report/wandb_log.py's writer, or None
        # (threshold, logged steps): experts below threshold x an even share, that many logs
        self._dead = DeadExperts(*dead_experts) if dead_experts and dead_experts[0] > 0 else None
        self._files: dict[str, Any] = {}
        self._tb: dict[str, _TensorBoard] = {}
        if not is_chief:
            return
        for kind in ("train", "eval"):
            folder = model_dir_lib.summary_dir(model_dir, kind)
            folder.mkdir(parents=True, exist_ok=True)
            metrics_file = model_dir_lib.metrics_file(model_dir, kind)
            self._files[kind] = _JsonLines(os.fspath(metrics_file), start_step)
            self._tb[kind] = _TensorBoard(os.fspath(folder))

    def step_done(self, step: int) -> None:
        """Call once per finished step (logged or not): the ETA's clock."""
        self.eta.update(step)

    def log_train(
        self, step: int, metrics: Mapping[str, Any], *, step_time: float, tokens: int
    ) -> dict:
        """Log one step; `step_time` is seconds per step, `tokens` tokens per step."""
        scalars, lists = flatten_metrics(metrics, self.moe_layers)
        scalars["step_time"] = float(step_time)
        scalars["tokens_per_s"] = tokens / step_time if step_time > 0 else 0.0
        if self.flops_per_step and self._peak:
            scalars["mfu"] = mfu(self.flops_per_step, step_time, self._peak)
        row = self._write("train", step, scalars, lists)
        if self.console:
            note, warnings = self._dead.update(step, lists) if self._dead else (None, [])
            for line in warnings:
                print(line, flush=True)
            print(self._progress(step, scalars, step_time, dead=note), flush=True)
        return row

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Log one evaluation (loss, accuracy, task metrics) at training step `step`."""
        scalars, lists = flatten_metrics(metrics, self.moe_layers)
        row = self._write("eval", step, scalars, lists)
        if self.console:
            keys = [k for k in ("loss", "cross_entropy", "accuracy") if k in scalars]
            shown = " ".join(f"{k} {_fmt(scalars[k])}" for k in keys)
            if shown:  # EVAL_STEPS=0: task metrics only, which decode/evaluation prints
                print(f"eval  step {step}: {shown}", flush=True)
        return row

    def _write(self, kind: str, step: int, scalars: dict, lists: dict) -> dict:
        row = {"step": int(step), **scalars, **lists}
        if self.is_chief:
            self._files[kind].write(json.dumps(row))
            self._tb[kind].write_scalars(int(step), scalars)
            if self.wandb is not None:
                self.wandb.log(kind, int(step), scalars)
        return row

    def _progress(self, step: int, s: dict, step_time: float, dead: str | None = None) -> str:
        eta = self.eta.remaining_s()  # None until a step after the compiled one has finished
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        for key, label in (("loss", "loss"), ("cross_entropy", "ce"), ("accuracy", "acc")):
            if key in s:
                parts.append(f"{label} {_fmt(s[key])}")
        if "moe/fraction_dropped" in s:
            parts.append(f"dropped {s['moe/fraction_dropped']:.1%}")
        if "moe/expert_usage_max" in s:  # 1.0x = a perfectly even share of tokens
            lo, hi = s["moe/expert_usage_min"], s["moe/expert_usage_max"]
            parts.append(f"expert load {lo:.2f}-{hi:.2f}x")
        if dead:
            parts.append(dead)
        if "learning_rate" in s:
            parts.append(f"lr {s['learning_rate']:.2e}")
        parts.append(f"{step_time:.2f}s/step {s['tokens_per_s']:,.0f} tok/s")
        if "mfu" in s and self._show_mfu:
            parts.append(f"mfu {s['mfu']:.1%}")
        parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA after step 2")
        return " | ".join(parts)

    def flush(self) -> None:
        """Push buffered events and lines to their files (before a checkpoint or an exit)."""
        for tb in self._tb.values():
            tb.flush()
        for f in self._files.values():
            f.flush()

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every writer; the logger writes nothing afterwards."""
        for tb in self._tb.values():
            tb.close()
        for f in self._files.values():
            f.close()
        self._tb, self._files = {}, {}
        if self.wandb is not None:
            self.wandb.finish(exit_code)
            self.wandb = None


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"
