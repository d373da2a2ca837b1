"""Build the HF parity fixtures under tests/fixtures/hf/ (needs torch + transformers; tests don't).

    pip install torch transformers        # from PyPI, into any venv with switch_jax's deps
    python scripts/make_hf_fixtures.py    # rewrites tests/fixtures/hf/{switch_tiny,t5_tiny}

Each fixture directory holds what `save_pretrained` writes (config.json + model.safetensors) and
`reference.npz`: a padded batch (right padding, different lengths per row) and what HF computes
on it in eval mode: logits, cross-entropy, its own router z / aux losses (layer-pooled, padding
included) and, per sparse layer, the router logits with the z / aux losses of HF's own loss
functions applied to the real tokens of each row (the quantities switch_jax reports per layer).

The models are random-init with small changes so that a parameter mix-up cannot pass: layer-norm
scales 1 + N(0, 0.1^2) (HF initialises them to exactly 1), and the Switch router scaled by 0.2
(HF's std-1.0 router init gives z-losses in the hundreds, beyond float32's 1e-5 absolute).
Re-run when transformers changes the modelling code; tests/test_convert.py reads the result.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import (
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")
VOCAB = 128


def switch_config() -> SwitchTransformersConfig:
    # expert_capacity 3 with 12 tokens and 4 experts: some tokens overflow and are dropped.
    return SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        num_experts=4,
        expert_capacity=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=20,
        router_jitter_noise=0.01,
        dropout_rate=0.1,
        decoder_start_token_id=0,
    )


def t5_config() -> T5Config:
    # T5.1.1: gated-gelu, untied logits; encoder and decoder depths differ on purpose.
    return T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,
        decoder_start_token_id=0,
    )


def perturb(model: torch.nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.from_numpy(1 + 0.1 * rng.standard_normal(p.shape)).float())
            if "router.classifier" in name:
                p.mul_(0.2)


def untie_lm_head(model: T5ForConditionalGeneration, rng: np.random.Generator) -> None:
    """A separate output layer, as in the released T5.1.1 checkpoints. transformers 5 always
    builds T5 tied (`scale_decoder_outputs` carries the 1.1 no-rescale); a distinct lm_head is
    kept untied on load, as it is for the released files."""
    weight = rng.standard_normal(tuple(model.lm_head.weight.shape)).astype(np.float32)
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(weight))
    model.config.tie_word_embeddings = False


def batch(rng: np.random.Generator, enc_lengths, dec_lengths, enc_len, dec_len) -> dict:
    """Right-padded ids in [2, VOCAB) (0 is padding, 1 is EOS, both kept out of real tokens)."""
    B = len(enc_lengths)
    enc = np.zeros((B, enc_len), np.int64)
    labels = np.full((B, dec_len), -100, np.int64)
    for b in range(B):
        enc[b, : enc_lengths[b]] = rng.integers(2, VOCAB, enc_lengths[b])
        labels[b, : dec_lengths[b]] = rng.integers(2, VOCAB, dec_lengths[b])
    dec_in = np.zeros_like(labels)
    dec_in[:, 1:] = np.where(labels[:, :-1] < 0, 0, labels[:, :-1])
    return {
        "input_ids": enc,
        "attention_mask": (enc > 0).astype(np.int64),
        "decoder_input_ids": dec_in,
        "labels": labels,
    }


def per_layer_router_losses(router_logits, mask_BL) -> tuple[list, list]:
    """HF's own loss functions, per layer and per row on that row's real tokens, averaged over
    rows (aux) or real tokens (z): what switch_jax reports with one group per sequence."""
    aux, z = [], []
    for logits in router_logits:
        rows_aux, z_sum = [], 0.0
        for b in range(logits.shape[0]):
            real = logits[b : b + 1, mask_BL[b].astype(bool)]
            probs = torch.softmax(real, dim=-1)
            rows_aux.append(float(hf_switch.load_balancing_loss_func(probs, real.argmax(-1))))
            z_sum += float(hf_switch.router_z_loss_func(real)) * real.shape[1]
        aux.append(np.mean(rows_aux))
        z.append(z_sum / mask_BL.sum())
    return aux, z


def run(name: str, model: torch.nn.Module, inputs: dict, switch: bool) -> None:
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    ref = {k: v for k, v in inputs.items()}
    with torch.no_grad():
        plain = model(**t)
        ref["logits"] = plain.logits.numpy().astype(np.float32)
        ref["cross_entropy"] = np.float64(plain.loss)
        if switch:
            full = model(**t, output_router_logits=True)
            ref["hf_total_loss"] = np.float64(full.loss)
            for stack in ("encoder", "decoder"):
                ref[f"hf_{stack}_z_loss"] = np.float64(getattr(full, f"{stack}_z_loss"))
                ref[f"hf_{stack}_aux_loss"] = np.float64(getattr(full, f"{stack}_aux_loss"))
                logits = getattr(full, f"{stack}_router_logits")
                mask = inputs["attention_mask"] if stack == "encoder" else inputs["labels"] >= 0
                aux, z = per_layer_router_losses(logits, mask)
                ref[f"{stack}_router_logits"] = np.stack([x.numpy() for x in logits])
                ref[f"{stack}_aux_loss"] = np.asarray(aux, np.float64)
                ref[f"{stack}_router_z_loss"] = np.asarray(z, np.float64)
    ref["transformers_version"] = np.asarray(transformers.__version__)
    ref["torch_version"] = np.asarray(torch.__version__)
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **ref)
    sizes = {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}
    print(name, json.dumps(sizes))


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    switch = SwitchTransformersForConditionalGeneration(switch_config()).eval()
    perturb(switch, rng)
    run("switch_tiny", switch, batch(rng, [12, 9, 5], [12, 7, 3], 12, 12), switch=True)
    t5 = T5ForConditionalGeneration(t5_config()).eval()
    perturb(t5, rng)
    untie_lm_head(t5, rng)
    run("t5_tiny", t5, batch(rng, [13, 10, 4], [7, 5, 2], 13, 7), switch=False)


if __name__ == "__main__":
    main()
