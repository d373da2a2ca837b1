"""What a training run prints besides the progress lines: header, ETA, summary, less noise.

    eta = Eta(total_steps)             # ETA from steps after compilation only
    eta.update(step)                   # once per finished step; eta.remaining_s() -> s or None
    print(header_lines(run, model_dir, resumed_from))
    print(summary_lines(...))
    filter_native_stderr()             # drop known C++ library noise (cuInit, cudart, ...)

The header names the devices and processes, the mesh, total and per-token active parameters,
MODEL_DIR and the step resumed from. The summary names the steps done, the time taken, the last
checkpoint, the command that resumes (or extends) the run, and how to look at it.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Sequence

from switch_jax.parallel import host_malloc

# C++ log lines of TensorFlow / XLA / CUDA stubs that a CPU run always prints and that say
# nothing to the user; shown again with --verbosity.
NATIVE_NOISE = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called"
    rb"|cudart_stub\.cc.*Could not find cuda drivers"
    rb"|cuda_platform\.cc.*failed call to cuInit"
    rb"|cuda_(?:dnn|fft|blas)\.cc.*Unable to register"
    rb"|computation_placer\.cc.*already registered"
    rb"|oneDNN custom operations are on"
    rb"|This TensorFlow binary is optimized to use available CPU instructions"
    rb"|TF-TRT Warning: Could not find TensorRT"
    rb"|rebuild TensorFlow with the appropriate compiler flags"
    # libtpu (the `tpu` extra) probing for TPU hosts on a machine that has none: it is only used
    # there to compile for TPU topologies ahead of time (switch_jax.compile).
    rb"|Failed to find host bounds for accelerator type"
    rb"|Logging before InitGoogle\(\) is written to STDERR"
    rb"|unexpected worker hostname .* from env var TPU_WORKER_HOSTNAMES"
    rb"|=== Source Location Trace: ===|^learning/\S+\.cc:\d+$"
    # XLA's slow-compile alarm (a banner of several lines); we print the compile time ourselves.
    rb"|slow_operation_alarm\.cc|^\*{32}$|Very slow compile\? If you want to file a bug"
)
# Python (absl) warnings of libraries that are expected on every run of ours.
PYTHON_NOISE = re.compile(
    r"Metadata file does not exist: .*_CHECKPOINT_METADATA"  # Orbax, reading an item's metadata
    # seqio, on every task read from Python (our embedded and file tasks): their shuffling is
    # seeded and checkpointed with the input position, and packing drops the *_pretokenized
    # strings that only the metric evaluation reads, from its own unpacked copy.
    r"|Using an uncached FunctionDataset for training is not recommended"
    r"|Features not in `features_length` will be removed during packing"
)
# A full disk: Orbax's save threads and asyncio log each failed write with a traceback; the
# trainer reports it as one line naming the lost step and the last intact checkpoint. The writes
# of the abandoned save outlive Orbax's asyncio loop, and asyncio reports their tasks at exit.
OUT_OF_SPACE = re.compile(
    r"No space left on device|RESOURCE_EXHAUSTED: Error writing"
    r"|Task was destroyed but it is pending"
)
_FILTER_INSTALLED = False


class Eta:
    """Remaining time from the wall-clock rate of the steps after this process's first step.

    The first step of a process includes tracing and compilation (minutes on a pod), so it is
    the baseline, never part of the rate; evaluations and checkpoint saves are, as they will
    recur until the end.
    """

    def __init__(self, total_steps: int, clock=time.perf_counter):
        self.total_steps = total_steps
        self.clock = clock
        self._base: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def update(self, step: int) -> None:
        """Note that `step` has just finished."""
        now = self.clock()
        if self._base is None:
            self._base = (step, now)
        self._last = (step, now)

    def seconds_per_step(self) -> float | None:
        """Wall seconds per step since the first step; None until a later step has finished."""
        if self._base is None or self._last is None or self._last[0] <= self._base[0]:
            return None
        return (self._last[1] - self._base[1]) / (self._last[0] - self._base[0])

    def remaining_s(self) -> float | None:
        """Seconds left to `total_steps` at the current rate; None while there is no rate."""
        rate = self.seconds_per_step()
        if rate is None:
            return None
        return max(self.total_steps - self._last[0], 0) * rate


class DeadExperts:
    """Experts whose share of tokens stays below `threshold` x an even share (1/E) for `logs`
    logged steps in a row: a note for the progress line and a warning the first time each one
    is seen dead. An expert that receives tokens again starts counting from zero.

    Fed the per-layer `moe/{stack}/layer_{i}/expert_fraction` lists of metrics.flatten_metrics.
    """

    _LIST = re.compile(r"^moe/(encoder|decoder)/layer_(\d+)/expert_fraction$")
    SHOWN = 4  # experts named per layer in the note; the rest are counted

    def __init__(self, threshold: float, logs: int):
        self.threshold, self.logs = threshold, logs
        self._streak: dict[tuple[str, int, int], int] = {}  # (stack, layer, expert) -> logs
        self._warned: set[tuple[str, int, int]] = set()

    def update(self, step: int, lists: dict[str, list]) -> tuple[str | None, list[str]]:
        """One logged step: (note such as 'dead: enc L1 e3,e5 (4 logs)' or None, warnings)."""
        dead: dict[tuple[str, int], list[int]] = {}
        longest = 0
        for name, fractions in lists.items():
            match = self._LIST.match(name)
            if not match:
                continue
            stack, layer = match[1], int(match[2])
            even = 1.0 / len(fractions)
            for expert, fraction in enumerate(fractions):
                key = (stack, layer, expert)
                low = fraction < self.threshold * even
                self._streak[key] = self._streak.get(key, 0) + 1 if low else 0
                if self._streak[key] >= self.logs:
                    dead.setdefault((stack, layer), []).append(expert)
                    longest = max(longest, self._streak[key])
        if not dead:
            return None, []
        warnings = []
        for (stack, layer), experts in sorted(dead.items()):
            new = [e for e in experts if (stack, layer, e) not in self._warned]
            self._warned.update((stack, layer, e) for e in new)
            if new:
                names = ", ".join(map(str, new))
                warnings.append(
                    f"warning: step {step}: dead experts {names} in {stack} layer {layer} (under "
                    f"{self.threshold:g}x an even share of tokens for {self.logs} logged steps; a "
                    "larger MoeConfig.aux_loss_coef may revive them)"
                )
        layers = [self._layer_note(stack, layer, e) for (stack, layer), e in sorted(dead.items())]
        return f"dead: {'; '.join(layers)} ({longest} logs)", warnings

    def _layer_note(self, stack: str, layer: int, experts: list[int]) -> str:
        shown = ",".join(f"e{e}" for e in experts[: self.SHOWN])
        more = f"+{len(experts) - self.SHOWN}" if len(experts) > self.SHOWN else ""
        return f"{stack[:3]} L{layer} {shown}{more}"


def duration(seconds: float) -> str:
    """'4m05s' or '2h13m': the coarse form a progress line needs."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def header_lines(run, model_dir: str, resumed_from: int | None) -> list[str]:
    """Devices and processes, mesh, parameters, MODEL_DIR, resume point (process 0 prints)."""
    import jax

    devices = jax.devices()
    mesh = run.partitioner.mesh
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    info = run.info
    moe = run.model_cfg.moe
    experts = f", {moe.num_experts} experts top-{moe.top_k}" if moe is not None else ", dense"
    start = f"resuming from step {resumed_from}" if resumed_from is not None else "new run"
    host = ""
    if devices[0].platform == "cpu":  # where the malloc is a large part of a step
        host = " | tcmalloc" if host_malloc.loaded_tcmalloc() else " | system malloc"
    return [
        f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}) in "
        f"{jax.process_count()} process(es) | mesh {axes}{host}",
        f"model: {_count(info.total_params)} parameters, {_count(info.active_params_per_token)} "
        f"active per token{experts}",
        f"MODEL_DIR: {model_dir} ({start})",
    ]


def python_command() -> str:
    """How to call this interpreter from the current directory: `python` when that is what the
    shell finds (an activated venv), else its path (`.venv/bin/python` after scripts/demo.sh),
    so that every printed command works when pasted."""
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    path = os.path.abspath(sys.executable)
    relative = os.path.relpath(path)
    return shlex.quote(relative if not relative.startswith("..") else path)


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line of this process, as `python -m switch_jax.train ...`."""
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if not a.startswith("--gin.TRAIN_STEPS=")]
    return " ".join([f"{python_command()} -m switch_jax.train", *map(_quote, args)])


def _quote(arg: str) -> str:
    """Shell quoting that keeps gin's own quotes readable: "--gin.X={'a': 1}"."""
    if "'" in arg and not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def summary_lines(
    *,
    first_step: int,
    step: int,
    total_steps: int,
    elapsed_s: float,
    last_checkpoint: int | None,
    checkpoint_dir: str,
    model_dir: str,
    stopped: str | None = None,
) -> list[str]:
    """What was done and what to type next."""
    done = f"trained steps {first_step + 1}-{step}" if step > first_step else "no step trained"
    state = stopped or ("finished" if step >= total_steps else "stopped")
    saved = "no checkpoint"
    if last_checkpoint is not None:
        path = os.path.join(checkpoint_dir, str(last_checkpoint))
        saved = f"last checkpoint: step {last_checkpoint} ({path})"
    again = "continue" if step >= total_steps else "resume"
    more = " --gin.TRAIN_STEPS=N" if step >= total_steps else ""
    return [
        f"{state}: {done} of {total_steps} in {duration(elapsed_s)}; {saved}",
        f"{again}: {resume_command()}{more}",
        f"plots: {python_command()} -m switch_jax.plot {shlex.quote(model_dir)}",
        f"tensorboard: {python_command()} -m tensorboard.main --logdir {shlex.quote(model_dir)}",
    ]


def quiet_known_noise() -> None:
    """Both filters (the default verbosity; --verbosity shows everything)."""
    import logging

    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(lambda record: not _is_noise(record))
    _drop_late_loop_callbacks()
    filter_native_stderr()


def _drop_late_loop_callbacks() -> None:
    """A save abandoned on an error (ENOSPC) leaves TensorStore writes in flight; when they finish,
    their callbacks reach an asyncio loop that Orbax already closed and each one reports an
    unraisable 'Event loop is closed'. Nothing is lost by then; the one-line error said it all."""
    previous = sys.unraisablehook

    def hook(args) -> None:
        error = args.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(args)

    sys.unraisablehook = hook


def _is_noise(record) -> bool:
    text = str(record.getMessage())
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
        text += f" {error}"
    return bool(PYTHON_NOISE.search(text) or OUT_OF_SPACE.search(text))


def filter_native_stderr(noise: re.Pattern = NATIVE_NOISE) -> None:
    """Route file descriptor 2 through a thread that drops lines matching `noise`.

    C++ libraries write to fd 2 directly (Python's logging cannot silence them); everything
    else, Python's stderr included, passes through unchanged. Drained at exit.
    """
    global _FILTER_INSTALLED
    if _FILTER_INSTALLED:
        return
    _FILTER_INSTALLED = True
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending, dropped = b"", False
        while chunk := os.read(read_end, 1 << 16):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            kept = []
            for line in lines:
                # A blank line right after a dropped one belongs to the same message.
                dropped = bool(noise.search(line)) or (dropped and not line.strip())
                if not dropped:
                    kept.append(line + b"\n")
            if kept:
                os.write(real, b"".join(kept))
        if pending and not noise.search(pending):
            os.write(real, pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's write end: the pump sees EOF once children exit
        thread.join(timeout=5)

    atexit.register(drain)
