"""README.md's "Using it" block runs as written after command 1, in a shell that activated .venv.

Command 1 (`bash scripts/demo.sh`) is replaced by the same training command cut to 2 steps, so
that `runs/demo/` exists as it would; then every command of the block runs in order through
bash, in one scratch directory, with the venv's bin first on PATH (what `source
.venv/bin/activate` does). The two fine-tunes get `--gin.TRAIN_STEPS` appended to keep the test
short; nothing else is changed. The block "At scale" needs a bucket or libtpu and minutes of
compile; its gin files are checked to exist and the scripts it names to be real modules.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains and evaluates the demo model through a dozen processes

REPO = Path(__file__).resolve().parent.parent
SHORT_TRAIN = ["--gin.TRAIN_STEPS=3", "--gin.EVAL_PERIOD=3", "--gin.CHECKPOINT_PERIOD=3"]


def _blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(section)
    following = text.find("\n## ", start + len(section))
    body = text[start : following if following >= 0 else None]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell commands of a block: comments dropped, backslash continuations joined."""
    commands, current = [], ""
    for line in block.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.endswith("|"):
            current += " "
            continue
        commands.append(current)
        current = ""
    assert not current, f"README block ends inside a command: {current!r}"
    return commands


def _activated_env() -> dict:
    bin_dir = os.path.dirname(sys.executable)  # .venv/bin under scripts/test.sh
    env = dict(os.environ)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = os.path.dirname(bin_dir)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # a laptop: one CPU device
    env.pop("PYTHONPATH", None)
    return env


def _run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail; " + command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_using_it_command_runs_as_written_after_command_1(tmp_path):
    (block, scale_block) = _blocks("## Using it")
    commands = _commands(block)
    assert commands[0] == "source .venv/bin/activate"
    env = _activated_env()
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "--gin_file=runs/demo.gin" in demo and "runs/demo" in demo
    first = _run(
        "python -m switch_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR=\"'runs/demo'\" "
        "--gin.TRAIN_STEPS=2 --gin.EVAL_STEPS=1",
        tmp_path,
        env,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = {}
    for command in commands[1:]:
        if "switch_jax.train" in command:
            command += " " + " ".join(SHORT_TRAIN)
        done = _run(command, tmp_path, env)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs[command] = done
    predictions = [
        out.stdout for cmd, out in outputs.items() if "switch_jax.infer" in cmd and "BEAM" in cmd
    ]
    assert predictions and '"predictions"' in predictions[0]
    assert (tmp_path / "runs" / "demo_ft_jsonl" / "checkpoints").is_dir()
    assert list((tmp_path / "runs" / "demo" / "plots").glob("*.png"))


def test_at_scale_commands_name_real_configs_and_modules():
    (_, scale_block) = _blocks("## Using it")
    commands = _commands(scale_block)
    assert len(commands) == 3
    for command in commands:
        words = shlex.split(command)
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module
        for word in words:
            if word.startswith("--gin_file="):
                assert (REPO / "configs" / word.split("=", 1)[1]).is_file(), word
