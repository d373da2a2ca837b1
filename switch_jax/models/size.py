"""Parameter counts and forward FLOPs of a config, from abstract shapes (nothing is allocated)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from switch_jax.models.config import ModelConfig
from switch_jax.models.moe import RouterBias
from switch_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    total_params: int
    expert_params: int
    active_params_per_token: int  # dense params + k/E of the expert params
    flops_per_token: float  # forward, matmuls (incl. attention scores and logits), Kaplan-style
    flops_per_sequence: float
    input_length: int
    target_length: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model of `cfg` with ShapeDtypeStruct leaves: graph, shapes and logical axes, nothing
    allocated. The one place a Transformer is built abstractly (training.steps, decoding and the
    counts here take their graph and shapes from it)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig, params=None) -> tuple[int, int]:
    """(total, expert) parameter counts; expert parameters carry a leading 'expert' axis (all
    but the loss-free choice bias, which every token uses).

    `params`: the abstract params of `cfg` when the caller has them (else built here).
    """
    if params is None:
        params = nnx.state(abstract_model(cfg), nnx.Param)
    total = expert = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        size = int(leaf.size)
        axes = leaf.get_metadata().get("out_sharding") or ()
        total += size
        # The loss-free choice bias lies along 'expert' but every token uses it, as the router.
        if "expert" in axes and not isinstance(leaf, RouterBias):
            expert += size
    return total, expert


def model_info(
    cfg: ModelConfig, input_length: int = 512, target_length: int = 114, *, params=None
) -> ModelInfo:
    """FLOPs for span-corruption lengths (encoder-decoder) or a target_length LM sequence;
    `params` as for count_params."""
    total, expert = count_params(cfg, params)
    k_over_e = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe else 0.0
    active = total - expert + int(round(expert * k_over_e))
    flops = _sequence_flops(cfg, input_length, target_length)
    tokens = (input_length if cfg.is_encoder_decoder else 0) + target_length
    return ModelInfo(total, expert, active, flops / tokens, flops, input_length, target_length)


def _sequence_flops(cfg: ModelConfig, input_length: int, target_length: int) -> float:
    D, F, HK = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim
    ffn = 2 * D * F * (3 if cfg.activation == "geglu" else 2)
    k = cfg.moe.top_k if cfg.moe else 1

    def ffn_flops(layer: int) -> float:
        if cfg.is_sparse(layer):
            return k * ffn + 2 * D * cfg.moe.num_experts  # experts + router
        return ffn

    def attention(q_tokens: int, kv_len: int) -> float:
        return q_tokens * (2 * 4 * D * HK + 2 * 2 * kv_len * HK)  # projections + scores/mix

    flops = 0.0
    if cfg.is_encoder_decoder:
        for layer in range(cfg.num_encoder_layers):
            flops += attention(input_length, input_length) + input_length * ffn_flops(layer)
    for layer in range(cfg.num_decoder_layers):
        flops += attention(target_length, target_length) + target_length * ffn_flops(layer)
        if cfg.is_encoder_decoder:
            flops += attention(target_length, input_length)
    return flops + target_length * 2 * D * cfg.vocab_size  # output logits
