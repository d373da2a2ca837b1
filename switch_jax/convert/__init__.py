"""Released Switch / T5 weights in and out: HF and T5X checkpoints <-> a switch_jax MODEL_DIR."""
