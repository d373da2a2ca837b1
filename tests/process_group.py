"""Run several cooperating processes (one per simulated host) and collect their output."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands: list[list[str]], *, env: dict, timeout: float, cwd=None) -> list[str]:
    """Start every command at once, wait for all, assert each exited 0; returns their outputs."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:  # never leave a worker behind (one may wait forever for its peer)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outputs
