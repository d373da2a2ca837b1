"""Console: ETA from post-compile steps, the summary's commands, library noise filtered."""

from __future__ import annotations

import subprocess
import sys

from switch_jax.report import console


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_eta_ignores_the_compiled_first_step():
    clock = FakeClock()
    eta = console.Eta(total_steps=100, clock=clock)
    clock.now = 300.0  # step 1: 5 minutes of compilation
    eta.update(1)
    assert eta.remaining_s() is None  # nothing measured after compilation yet
    for step in range(2, 11):
        clock.now += 2.0
        eta.update(step)
    assert eta.seconds_per_step() == 2.0
    assert eta.remaining_s() == 90 * 2.0


def test_eta_of_a_resumed_run_starts_at_its_first_step():
    clock = FakeClock()
    eta = console.Eta(total_steps=500, clock=clock)
    clock.now = 60.0
    eta.update(401)  # first step after resuming from 400: compiled here
    clock.now = 70.0
    eta.update(411)
    assert eta.remaining_s() == 89 * 1.0


def test_summary_names_checkpoint_and_commands(monkeypatch):
    argv = ["switch-train", "--gin_file=runs/demo.gin", "--gin.MODEL_DIR=/r", "--gin.TRAIN_STEPS=9"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(console, "python_command", lambda: "python")
    lines = console.summary_lines(
        first_step=0,
        step=9,
        total_steps=9,
        elapsed_s=125,
        last_checkpoint=9,
        checkpoint_dir="/r/checkpoints",
        model_dir="/r",
    )
    assert lines == [
        "finished: trained steps 1-9 of 9 in 2m05s; last checkpoint: step 9 (/r/checkpoints/9)",
        "continue: python -m switch_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR=/r "
        "--gin.TRAIN_STEPS=N",
        "plots: python -m switch_jax.plot /r",
        "tensorboard: python -m tensorboard.main --logdir /r",
    ]
    stopped = console.summary_lines(
        first_step=4,
        step=6,
        total_steps=9,
        elapsed_s=5,
        last_checkpoint=6,
        checkpoint_dir="/r/checkpoints",
        model_dir="/r",
        stopped="interrupted",
    )
    assert stopped[0].startswith("interrupted: trained steps 5-6 of 9")
    assert (
        stopped[1]
        == "resume: python -m switch_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR=/r"
    )


def test_printed_python_is_the_one_the_shell_finds_or_this_interpreter(monkeypatch, tmp_path):
    venv_python = tmp_path / "bin" / "python"
    venv_python.parent.mkdir()
    venv_python.write_text("")
    venv_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_python))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")  # not activated: the path works when pasted
    assert console.python_command() == "bin/python"
    monkeypatch.setenv("PATH", str(venv_python.parent))  # activated: plain `python`
    assert console.python_command() == "python"


def test_resume_command_keeps_gin_quotes_readable(monkeypatch):
    monkeypatch.setattr(console, "python_command", lambda: "python")
    argv = ["x", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64}", "--gin.MODEL_DIR=/a b"]
    assert console.resume_command(argv) == (
        "python -m switch_jax.train \"--gin.TASK_FEATURE_LENGTHS={'inputs': 64}\" "
        "'--gin.MODEL_DIR=/a b'"
    )


def test_native_noise_is_dropped_and_everything_else_kept():
    code = (
        "import os, sys\n"
        "from switch_jax.report import console\n"
        "console.filter_native_stderr()\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR\\n')\n"
        "os.write(2, b'E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: x\\n')\n"
        "os.write(2, b'E1201 slow_operation_alarm.cc:140] The operation took 2m13s\\n\\n')\n"
        "os.write(2, b'*' * 32 + b'\\n[Compiling module jit_init for CPU] Very slow compile? "
        "If you want to file a bug, run with x\\n' + b'*' * 32 + b'\\n')\n"
        "os.write(2, b'Failed to find host bounds for accelerator type: WARNING: could not "
        "determine TPU accelerator type, please set env var\\n')\n"
        "os.write(2, b'WARNING: Logging before InitGoogle() is written to STDERR\\n')\n"
        'os.write(2, b"E0000 00:00:1.0 2 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected '
        "worker hostname 'WARNING: x' from env var TPU_WORKER_HOSTNAMES. Expecting y\\n\")\n"
        "os.write(2, b'=== Source Location Trace: ===\\n')\n"
        "os.write(2, b'learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\\n')\n"
        "os.write(2, b'a real C++ error\\n\\n')\n"
        "print('ConfigError: one line', file=sys.stderr)\n"
        "os.write(2, b'no newline at exit')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stderr == "a real C++ error\n\nConfigError: one line\nno newline at exit"


def test_out_of_space_tracebacks_of_library_threads_are_dropped():
    code = (
        "import logging\n"
        "from absl import logging as absl_logging\n"
        "from switch_jax.report import console\n"
        "console.quiet_known_noise()\n"
        "try:\n"
        "    raise OSError(28, 'No space left on device')\n"
        "except OSError:\n"
        "    absl_logging.exception('_SignalingThread.run() raised an exception')\n"
        "logging.getLogger('asyncio').error(\"exception=OSError(28, 'No space left on device')\")\n"
        "absl_logging.warning('Metadata file does not exist: /r/3/state/_CHECKPOINT_METADATA')\n"
        "absl_logging.warning('a real warning')\n"
        # A TensorStore write finishing after its asyncio loop closed (an abandoned save).
        "import asyncio, tensorstore as ts\n"
        "promise, future = ts.Promise.new()\n"
        "pending = []\n"
        "async def wait():\n"
        "    await future\n"
        "async def start():\n"
        "    pending.append(asyncio.get_running_loop().create_task(wait()))\n"
        "    await asyncio.sleep(0.01)\n"
        "loop = asyncio.new_event_loop()\n"
        "loop.run_until_complete(start())\n"
        "loop.close()\n"
        "promise.set_result(1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stderr.strip().splitlines() == ["WARNING:absl:a real warning"], out.stderr


def test_seqio_warnings_of_every_fine_tune_are_noise():
    import logging

    def record(message: str, *args) -> logging.LogRecord:
        return logging.LogRecord("absl", logging.WARNING, "x.py", 1, message, args, None)

    # Verbatim from a fine-tune of runs/finetune_demo.gin (seqio 0.0.20).
    uncached = (
        "Using an uncached FunctionDataset for training is not recommended since it often "
        "results in insufficient shuffling on restarts, resulting in overfitting."
    )
    packing = "Features not in `features_length` will be removed during packing: %s"
    assert console._is_noise(record(uncached))
    assert console._is_noise(record(packing, {"targets_pretokenized", "inputs_pretokenized"}))
    assert not console._is_noise(record("Features of task %s are missing", "x"))
