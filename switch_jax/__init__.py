"""switch_jax: Switch Transformers in JAX/Flax (README.md, docs/architecture.md)."""

from switch_jax.parallel import host_malloc as _host_malloc

# A command that runs steps restarts under TCMalloc here, before jax is imported and its
# allocations made (parallel/host_malloc.py); any other import of the package goes on as is.
_host_malloc.restart_early()
