"""Run several cooperating processes (one per simulated host) and collect their output."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a coordinator address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_train(gin_args: list[str], *, repo) -> tuple[list[list[str]], dict]:
    """Commands and environment of a 2-process `switch_jax.train` on runs/demo.gin, 4 simulated
    CPU devices per process, joined through a local coordinator."""
    import os
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    port = free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "switch_jax.train",
            "--gin_file=runs/demo.gin",
            *gin_args,
            f"--coordinator_address=127.0.0.1:{port}",
            "--process_count=2",
            f"--process_index={i}",
            "--distributed_timeout_s=120",
        ]  # fmt: skip
        for i in range(2)
    ]
    return commands, env


def start_all(commands: list[list[str]], *, env: dict, cwd=None) -> list[subprocess.Popen]:
    """Start every command at once, stdout and stderr merged into one text pipe each."""
    return [
        subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
    ]


def finish_all(procs: list[subprocess.Popen], *, timeout: float, head=()) -> list[str]:
    """Wait for every process, assert each exited 0; returns their outputs (after `head[i]`,
    text already read from process i).

    A process still running after `timeout` seconds fails the test with every process's last
    output lines, so that a hang shows where each host was.
    """
    head = [*head, *[""] * (len(procs) - len(head))]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs[len(outputs) :]:
            proc.kill()
        # communicate() again returns what was read before the timeout plus the rest.
        outputs += [proc.communicate()[0] for proc in procs[len(outputs) :]]
        outputs = [h + o for h, o in zip(head, outputs, strict=True)]
        tails = "\n".join(f"--- process {i}:\n{out[-2000:]}" for i, out in enumerate(outputs))
        raise AssertionError(f"still running after {timeout} s\n{tails}") from None
    finally:
        for proc in procs:  # never leave a worker behind (one may wait forever for its peer)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    outputs = [h + o for h, o in zip(head, outputs, strict=True)]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def run_all(commands: list[list[str]], *, env: dict, timeout: float, cwd=None) -> list[str]:
    """Start every command at once, wait for all, assert each exited 0; returns their outputs."""
    return finish_all(start_all(commands, env=env, cwd=cwd), timeout=timeout)
