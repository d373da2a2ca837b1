"""Joining the multi-process JAX runtime (TPU pods, multi-host GPU, localhost CPU tests)."""

from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
    """True on environments jax can configure itself (TPU pod slices, SLURM, k8s, MPI)."""
    try:
        from jax._src import clusters  # noqa: PLC0415 (private; absent -> assume none)

        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)
    except Exception:  # noqa: BLE001 (detection must never break single-host runs)
        return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Call `jax.distributed.initialize` when this run has (or may have) several processes.

    Arguments win over the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    environment variables; with neither, only a detected cluster triggers initialization.
    Must run before anything touches devices. Returns True if the runtime is distributed.

    Args:
      coordinator_address: 'host:port' of process 0.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      local_device_ids: devices this process drives (default: all it sees).
      timeout_s: how long to wait for the other processes.
    """
    if jax.distributed.is_initialized():  # tests and notebooks may call an entry twice
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _cluster_detected():
        return False
    # CPU processes need a collectives backend to talk to each other; no effect elsewhere.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )
    return True
