"""`python -m switch_jax.convert ...` (see switch_jax.convert.main)."""

from switch_jax.convert.main import run

run()
