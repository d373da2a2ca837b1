"""Benchmark pieces behind `python -m switch_jax.bench` (timing, train step, MoE layer, I/O)."""
