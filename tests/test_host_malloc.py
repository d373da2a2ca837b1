"""The restart under TCMalloc (parallel/host_malloc.py): when, with what, and for real."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from switch_jax.models.config import ConfigError
from switch_jax.parallel import host_malloc

PY = "/venv/bin/python"


@pytest.fixture
def library_dir(tmp_path, monkeypatch):
    """A folder holding a file named like TCMalloc; the linker's search finds nothing else."""
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return str(tmp_path)


@pytest.mark.parametrize(
    "argv, command",
    [
        ([PY, "-m", "switch_jax.train", "--gin_file=x.gin"], "train"),
        ([PY, "-u", "-X", "dev", "-m", "switch_jax.bench"], "bench"),
        ([PY, "/venv/bin/switch-eval", "--gin.MODEL_DIR='m'"], "eval"),
        ([PY, "-W", "ignore", "/venv/bin/switch-infer"], "infer"),
        ([PY, "-m", "pytest", "tests"], None),
        ([PY, "/venv/bin/pytest", "-m", "switch_jax.train"], None),
        ([PY, "-c", "import switch_jax.train"], None),
        ([PY], None),
    ],
)
def test_the_command_a_process_was_started_as(argv, command):
    assert host_malloc.started_command(argv) == command


def test_restart_preloads_the_library_once(library_dir):
    argv = [PY, "-u", "-m", "switch_jax.train", "--gin.TRAIN_STEPS=3"]
    env = {"LD_PRELOAD": "/lib/other.so", "HOME": "/h"}
    new_argv, new_env = host_malloc.restart_command(
        env, argv, "/usr/bin/python3", platform="linux", dirs=[library_dir]
    )
    library = os.path.join(library_dir, "libtcmalloc_minimal.so.4")
    assert new_argv == ["/usr/bin/python3", *argv[1:]]
    assert new_env["LD_PRELOAD"] == f"{library}:/lib/other.so"
    assert new_env["HOME"] == "/h" and new_env[host_malloc.RESTARTED_ENV] == "1"
    assert int(new_env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert env == {"LD_PRELOAD": "/lib/other.so", "HOME": "/h"}  # the caller's is unchanged
    # The restarted process (marker set) and a process with TCMalloc mapped stay as they are.
    kwargs = dict(platform="linux", dirs=[library_dir])
    assert host_malloc.restart_command(new_env, argv, PY, **kwargs) is None
    assert host_malloc.restart_command({}, argv, PY, loaded="/x/libtcmalloc.so.4", **kwargs) is None


def test_a_threshold_the_user_set_is_kept(library_dir):
    env = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "12345"}
    _, new_env = host_malloc.restart_command(
        env, [PY, "-m", "switch_jax.bench"], PY, platform="linux", dirs=[library_dir]
    )
    assert new_env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "12345"
    assert new_env["LD_PRELOAD"] == os.path.join(library_dir, "libtcmalloc_minimal.so.4")


def test_no_restart_where_asked_or_nothing_to_preload(library_dir, tmp_path):
    argv = [PY, "-m", "switch_jax.train"]
    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    system = {host_malloc.CHOICE_ENV: "system"}
    linux = dict(platform="linux", dirs=[library_dir])
    assert host_malloc.restart_command(system, argv, PY, **linux) is None
    assert host_malloc.restart_command({}, argv, PY, platform="linux", dirs=[empty]) is None
    assert host_malloc.restart_command({}, argv, PY, platform="darwin", dirs=[library_dir]) is None


def test_settings_that_cannot_hold_are_one_line_errors(library_dir, tmp_path):
    argv = [PY, "-m", "switch_jax.train"]
    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    required = {host_malloc.CHOICE_ENV: "tcmalloc"}
    with pytest.raises(ConfigError, match="choose from auto, tcmalloc, system"):
        host_malloc.restart_command({host_malloc.CHOICE_ENV: "jemalloc"}, argv, PY)
    with pytest.raises(ConfigError, match="no TCMalloc library on this machine"):
        host_malloc.restart_command(required, argv, PY, platform="linux", dirs=[empty])
    with pytest.raises(ConfigError, match="no TCMalloc library on this platform"):
        host_malloc.restart_command(required, argv, PY, platform="darwin", dirs=[library_dir])
    missing = {host_malloc.LIBRARY_ENV: str(tmp_path / "nope.so")}
    with pytest.raises(ConfigError, match="nope.so: no such file"):
        host_malloc.restart_command(missing, argv, PY, platform="linux", dirs=[library_dir])
    given = tmp_path / "custom.so"
    given.write_bytes(b"")
    _, env = host_malloc.restart_command(
        {host_malloc.LIBRARY_ENV: str(given)}, argv, PY, platform="linux", dirs=[empty]
    )
    assert env["LD_PRELOAD"] == str(given)


def test_the_mapped_library_is_read_from_the_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 rw-p 00000000 00:00 0\n"
        "7f04-7f05 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
    )
    assert host_malloc.loaded_tcmalloc(str(maps)).endswith("libtcmalloc_minimal.so.4.5.10")
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert host_malloc.loaded_tcmalloc(str(maps)) is None
    assert host_malloc.loaded_tcmalloc(str(tmp_path / "absent")) is None


def _run_as(tmp_path, name, extra_env):
    """A script named like a console script that imports the package and reports its malloc:
    the import restarts a step command's, as it does the real command."""
    script = tmp_path / name
    script.write_text(
        "import switch_jax\n"
        "from switch_jax.parallel import host_malloc\n"
        "print(host_malloc.describe())\n"
    )
    # Nothing preloaded or chosen by the caller's environment (a TPU VM may preload TCMalloc).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCH_JAX_MALLOC")}
    env.pop("LD_PRELOAD", None)
    env.update(extra_env)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_malloc.find_tcmalloc(os.environ) is None,
    reason="no TCMalloc library on this machine (apt-get install libtcmalloc-minimal4)",
)
def test_a_step_command_really_restarts_under_tcmalloc(tmp_path):
    assert _run_as(tmp_path, "switch-bench", {}).startswith("tcmalloc (")
    assert _run_as(tmp_path, "switch-bench", {host_malloc.CHOICE_ENV: "system"}) == "system malloc"
    assert _run_as(tmp_path, "switch-info", {}) == "system malloc"  # runs no steps


def test_the_run_header_names_the_malloc_on_cpu(monkeypatch):
    from types import SimpleNamespace

    import jax

    from switch_jax.report import console

    run = SimpleNamespace(
        partitioner=SimpleNamespace(mesh=SimpleNamespace(shape={"data": 1, "expert": 1})),
        info=SimpleNamespace(total_params=10, active_params_per_token=5),
        model_cfg=SimpleNamespace(moe=None),
    )
    assert jax.devices()[0].platform == "cpu"
    monkeypatch.setattr(host_malloc, "loaded_tcmalloc", lambda: None)
    assert console.header_lines(run, "m", None)[0].endswith("mesh data=1 expert=1 | system malloc")
    monkeypatch.setattr(host_malloc, "loaded_tcmalloc", lambda: "/usr/lib/libtcmalloc.so.4")
    assert console.header_lines(run, "m", None)[0].endswith("mesh data=1 expert=1 | tcmalloc")
