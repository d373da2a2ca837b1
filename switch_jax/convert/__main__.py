"""Released weights in and out of a switch_jax MODEL_DIR (docs/checkpoints.md).

  python -m switch_jax.convert --from=hf --source=HF_DIR --model_dir=OUT
  python -m switch_jax.convert --from=t5x --source=CKPT_DIR --model_dir=OUT \
      --gin_file=models/switch_base_8.gin
  python -m switch_jax.convert --to=hf --model_dir=IN --output=HF_DIR [--expert_capacity=64]
"""

from switch_jax.convert.main import run

run()
