"""Print the HF parity figures of docs/checkpoints.md (no torch needed).

    JAX_PLATFORMS=cpu python scripts/hf_parity_report.py

Converts each fixture under tests/fixtures/hf (written by make_hf_fixtures.py) into a temporary
MODEL_DIR, restores it the way INIT_CHECKPOINT does, runs our float32 model with HF's per-sequence
capacity on the fixture's padded batch and compares with the HF outputs stored beside it.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from switch_jax.formats import convert, hf_config
from switch_jax.parallel import partitioning
from switch_jax.store import checkpoints
from switch_jax.training import steps

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")


def report(name: str) -> None:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = convert.import_hf(os.path.join(FIXTURES, name), os.path.join(tmp, "model"))
        cfg = cfg.replace(dtype="float32", z_loss=0.0)
        if cfg.moe:
            with open(os.path.join(FIXTURES, name, "config.json")) as f:
                capacity = json.load(f)["expert_capacity"]
            cfg = hf_config.hf_routing(cfg, ref["input_ids"].shape[1], capacity)
        partitioner = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
        abstract = steps.abstract_params(cfg, partitioner)
        params = checkpoints.restore_params(os.path.join(tmp, "model"), abstract.params)
    labels = ref["labels"]
    batch = {
        "encoder_input_tokens": ref["input_ids"].astype(np.int32),
        "decoder_input_tokens": ref["decoder_input_ids"].astype(np.int32),
        "decoder_target_tokens": np.where(labels < 0, 0, labels).astype(np.int32),
    }

    @jax.jit
    def run(params):
        from flax import nnx

        logits, stats = nnx.merge(abstract.graphdef, params)(batch)
        _, metrics = steps.compute_loss(cfg, abstract.graphdef, params, batch, train=False)
        return logits, stats, metrics

    logits, stats, metrics = jax.device_get(run(params))
    real = labels >= 0
    diff = np.abs(logits - ref["logits"])[real]
    print(
        f"{name}: HF transformers {ref['transformers_version']}, {int(real.sum())} real target "
        f"tokens of {real.size}; |logits| max {np.abs(ref['logits'][real]).max():.2f}"
    )
    print(f"  logits max |diff| {diff.max():.2e} (mean {diff.mean():.1e})")
    ce = float(metrics["cross_entropy"])
    print(f"  cross-entropy ours {ce:.7f} HF {float(ref['cross_entropy']):.7f} "
          f"|diff| {abs(ce - float(ref['cross_entropy'])):.1e}")  # fmt: skip
    for stack in ("encoder", "decoder") if cfg.moe else ():
        s = stats[stack]
        for key, label in (("aux_loss", "aux"), ("router_z_loss", "router z")):
            d = np.abs(np.asarray(getattr(s, key)) - ref[f"{stack}_{key}"]).max()
            print(f"  {stack} {label} per layer {np.round(getattr(s, key), 5)} max |diff| {d:.1e}")
        print(f"  {stack} fraction dropped per layer {np.round(s.fraction_dropped, 3)}")


if __name__ == "__main__":
    for fixture in ("switch_tiny", "t5_tiny"):
        report(fixture)
