"""Two processes on localhost (4 CPU devices each, gloo) train as one 8-device mesh."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest
from process_group import free_port, run_all
from test_sharded_training import OPT, B, tiny_batch, tiny_config

from switch_jax.parallel import hosts, partitioning
from switch_jax.training import steps

TESTS = Path(__file__).resolve().parent
ARCH = "decoder_only"  # the cheaper compile; test_sharded_training covers both architectures
WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_compilation_cache_dir", os.environ["CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from switch_jax.parallel import hosts
    from switch_jax.parallel import partitioning
    from switch_jax.training import steps
    from test_sharded_training import OPT, B, tiny_batch, tiny_config

    port, pid, ARCH = sys.argv[1], int(sys.argv[2]), "decoder_only"
    assert hosts.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    # data across the two processes (the multi-slice layout), expert x model inside each.
    p = partitioning.Partitioner((1, 2, 2), dcn_mesh_shape=(2, 1, 1))
    setup = steps.setup_training(p.adapt_model_config(tiny_config(ARCH), B), OPT, p)
    state = setup.init_state()
    rows = p.host_batch_slice(B)
    batch = p.shard_batch({k: v[rows] for k, v in tiny_batch(ARCH).items()})
    losses = []
    for _ in range(2):
        state, metrics = setup.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    print("RESULT " + json.dumps({"losses": losses, "rows": [rows.start, rows.stop]}), flush=True)
    jax.distributed.shutdown()
    """
)


def _single_process_losses() -> list[float]:
    p = partitioning.Partitioner((2, 2, 2))
    setup = steps.setup_training(p.adapt_model_config(tiny_config(ARCH), B), OPT, p)
    state, batch, losses = setup.init_state(), p.shard_batch(tiny_batch(ARCH)), []
    for _ in range(2):
        state, metrics = setup.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def test_two_processes_reproduce_single_process_losses(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    env["CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir or tmp_path / "cache")
    port = free_port()
    start = time.monotonic()
    commands = [[sys.executable, str(script), str(port), str(i)] for i in range(2)]
    outputs = run_all(commands, env=env, timeout=240)
    elapsed = time.monotonic() - start
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
    want = _single_process_losses()
    assert [r["rows"] for r in results] == [[0, B // 2], [B // 2, B]]
    for r in results:
        assert r["losses"] == pytest.approx(want, rel=2e-6)
    # Mostly gloo connection set-up (one context per collective group) and, on a cold compile
    # cache, XLA compiles; the two workers share the test compile cache.
    print(f"two-process run took {elapsed:.1f} s")


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert hosts.initialize() is False
    assert jax.process_count() == 1
