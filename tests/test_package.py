"""The built wheel works on its own: configs ship inside it and every console script runs.

The wheel is built from a copy of the tracked sources, installed with `pip install --target`
(dependencies come from this interpreter's site-packages), and run from an empty directory with
the source tree off sys.path, as a user who ran `pip install switch_jax` would.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel, then trains 2 steps in a subprocess

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "switch-train",
    "switch-eval",
    "switch-infer",
    "switch-info",
    "switch-bench",
    "switch-plot",
    "switch-convert",
    "switch-experts",
)
# The fault tests' cache and shapes: the train step below compiles once per machine.
CACHE = os.environ.get(
    "SWITCH_JAX_FAULTS_CACHE", os.path.expanduser("~/.cache/switch_jax/jax_faults")
)


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, install dir): a wheel of the current sources installed into a bare dir."""
    root = tmp_path_factory.mktemp("package")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("switch_jax", "configs"):  # configs/ becomes switch_jax/configs in the wheel
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), ".", cwd=src)
    (wheel,) = glob.glob(str(root / "dist" / "*.whl"))
    target = root / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(target), wheel, cwd=root)
    return Path(wheel), target


def _run(target: Path, cwd: Path, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(target),  # the installed copy, never the checkout
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "NO_GCE_CHECK": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_wheel_ships_the_configs_and_every_console_script(installed):
    wheel, target = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    # configs/ at the checkout's top is switch_jax/configs/ in the wheel.
    shipped = {"switch_jax/" + str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.gin")}
    assert shipped and shipped <= names, sorted(shipped - names)
    for script in SCRIPTS:
        assert f"{script} = " in entry_points
        assert (target / "bin" / script).exists(), script


def test_installed_info_and_train_from_another_directory(installed, tmp_path):
    _, target = installed
    where = _run(
        target, tmp_path, sys.executable, "-c", "import switch_jax; print(switch_jax.__file__)"
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr

    info = _run(
        target,
        tmp_path,
        str(target / "bin" / "switch-info"),
        "--gin_file=models/switch_base.gin",
        "--json",
    )
    assert info.returncode == 0, info.stderr[-2000:]
    assert "7415217408" in info.stdout  # Switch-Base (128 experts): 7.4B parameters

    pytest.importorskip("seqio")
    train = _run(
        target,
        tmp_path,
        str(target / "bin" / "switch-train"),
        "--gin_file=runs/demo.gin",
        "--gin.MODEL_DIR=run",  # relative to the other directory
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
        "--gin.EVAL_STEPS=1",
        "--gin.LOG_PERIOD=1",
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()

    pytest.importorskip("matplotlib")
    drawn = _run(target, tmp_path, str(target / "bin" / "switch-plot"), "run")
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (tmp_path / "run" / "plots" / "expert_load.png").is_file()

    # Released-weights path on the trained run: export to HF, import back, evaluate the import.
    convert = str(target / "bin" / "switch-convert")
    out = _run(target, tmp_path, convert, "--to=hf", "--model_dir=run", "--output=hf")
    assert out.returncode == 0, out.stderr[-2000:]
    back = _run(target, tmp_path, convert, "--from=hf", "--source=hf", "--model_dir=imported")
    assert back.returncode == 0, back.stderr[-2000:]
    evaluated = _run(
        target,
        tmp_path,
        str(target / "bin" / "switch-eval"),
        "--gin_file=runs/demo.gin",
        "--gin_file=imported/config.gin",  # after demo.gin: the imported model's bindings win
        "--gin.MODEL_DIR=imported",
        "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
        "--gin.EVAL_STEPS=1",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    # the same validation batch as the run's own final eval: HF and back changes no weight
    trained = [json.loads(line) for line in (tmp_path / "run" / "eval" / "metrics.jsonl").open()]
    assert result["step"] == 0 and trained[-1]["step"] == 2
    assert abs(result["cross_entropy"] - trained[-1]["cross_entropy"]) < 1e-5


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject.toml lists the packages (configs/ comes from the top of the repository), so a
    new folder under switch_jax/ that is missing from the list would be left out of the wheel."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "switch_jax").rglob("__init__.py")
    }
    assert folders <= listed, sorted(folders - listed)
    assert {"switch_jax.configs", "switch_jax.configs.models", "switch_jax.configs.runs"} <= listed
