"""Test session set-up: 8 simulated CPU devices (before jax is imported) and a compile cache."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NO_GCE_CHECK", "true")
# Set in the environment, not only in jax.config, so that every `python -m switch_jax.*` a test
# starts (CLI, multi-host and package tests) compiles through the same persistent cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
    "SWITCH_JAX_TEST_CACHE", os.path.expanduser("~/.cache/switch_jax/jax_tests")
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
