"""HF `config.json` (SwitchTransformers, T5 / T5.1.1) <-> ModelConfig; refuses what we don't model.

Every field of a config.json is either mapped, checked to have the one value we implement, or
known not to change the forward pass; any other field is refused with a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig

SWITCH, T5 = "switch", "t5"
_MODEL_TYPES = {"switch_transformers": SWITCH, "t5": T5}

# Generic PretrainedConfig / generation / tokenizer bookkeeping: no effect on the forward pass.
_IGNORED = frozenset(
    """_name_or_path architectures model_type transformers_version torch_dtype dtype use_cache
    initializer_factor eos_token_id bos_token_id sep_token_id n_positions task_specific_params
    output_past gradient_checkpointing classifier_dropout output_hidden_states output_attentions
    return_dict torchscript use_bfloat16 pruned_heads chunk_size_feed_forward id2label label2id
    problem_type tokenizer_class prefix finetuning_task max_length min_length num_beams do_sample
    early_stopping temperature top_k top_p repetition_penalty length_penalty no_repeat_ngram_size
    bad_words_ids num_return_sequences diversity_penalty num_beam_groups output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens typical_p
    encoder_no_repeat_ngram_size cross_attention_hidden_size tf_legacy_loss xla_device
    add_router_probs router_ignore_padding_tokens encoder_sparse_step decoder_sparse_step
    is_gated_act dense_act_fn output_router_logits""".split()
)
# Fields that must hold exactly this value (the only one switch_jax implements).
_REQUIRED = {
    "is_encoder_decoder": True,
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "pad_token_id": 0,  # our padding / segment id 0
    "decoder_start_token_id": 0,  # our decoder inputs open with id 0
    "layer_norm_epsilon": 1e-6,
    "router_bias": False,
    "num_selected_experts": 1,  # written by the 4.25 converter of the released Switch files
    "router_type": "tokens_masked",  # (ditto): top-1 token choice with capacity masking
}
_MAPPED = frozenset(
    """vocab_size d_model d_kv d_ff num_heads num_layers num_decoder_layers dropout_rate
    relative_attention_num_buckets relative_attention_max_distance tie_word_embeddings
    scale_decoder_outputs feed_forward_proj num_experts expert_capacity num_sparse_encoder_layers
    num_sparse_decoder_layers router_jitter_noise router_dtype router_z_loss_coef
    router_aux_loss_coef""".split()
)
_SWITCH_ACT = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_T5_ACT = {"relu": "relu", "gated-gelu": "geglu", "gelu_new": "gelu", "gated-gelu_new": "geglu"}


@dataclasses.dataclass(frozen=True)
class HfModel:
    """What config.json says, in our terms, plus the HF-only settings the converter keeps."""

    flavor: str  # SWITCH or T5
    model_cfg: ModelConfig
    expert_capacity: int | None  # HF's fixed per-sequence capacity (Switch only)
    dropout_rate: float  # HF's dropout (our DROPOUT_RATE macro, set by run files)


def read_config(directory: str) -> dict:
    """The JSON object of DIRECTORY/config.json, or a ConfigError naming the file and line."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--source={directory} has no config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; download config.json again") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} line {e.lineno}: invalid JSON ({e.msg}); is it truncated? download it again"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def flavor_of(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(
            f"config.json model_type={model_type!r} is not supported (switch_transformers or t5)"
        )
    return _MODEL_TYPES[model_type]


def from_hf(config: dict, *, lm_head_separate: bool) -> HfModel:
    """ModelConfig of a config.json; `lm_head_separate`: the weights hold their own lm_head
    (not the embedding), as the released T5.1.1 files do."""
    flavor = flavor_of(config)
    for key in config:
        if key not in _IGNORED and key not in _REQUIRED and key not in _MAPPED:
            raise ConfigError(
                f"config.json field {key!r} is not modelled by switch_jax (remove it if it does "
                f"not change the model's computation)"
            )
    for key, value in _REQUIRED.items():
        if key in config and config[key] is not None and config[key] != value:
            raise ConfigError(
                f"config.json {key}={config[key]!r} is not supported (only {value!r})"
            )
    get = _getter(config, flavor)
    n_enc = get("num_layers")
    n_dec = get("num_decoder_layers") or n_enc
    # transformers 5 writes T5 as tied with `scale_decoder_outputs`; 4.x and the released T5.1.1
    # files say tie_word_embeddings=False. Rescaling by d_model**-0.5 goes with tied logits here.
    tied = bool(get("tie_word_embeddings"))
    scale = bool(config.get("scale_decoder_outputs", tied))
    if scale and lm_head_separate:
        raise ConfigError(
            "config.json tie_word_embeddings=True (rescaled logits) with a separate lm_head "
            "weight: switch_jax rescales only tied logits"
        )
    cfg = dict(
        vocab_size=get("vocab_size"),
        d_model=get("d_model"),
        d_ff=get("d_ff"),
        num_heads=get("num_heads"),
        head_dim=get("d_kv"),
        num_encoder_layers=n_enc,
        num_decoder_layers=n_dec,
        relative_buckets=get("relative_attention_num_buckets"),
        relative_max_distance=get("relative_attention_max_distance"),
        tied_logits=scale,
        activation=_activation(config, flavor),
        moe=None,
    )
    capacity = None
    if flavor == SWITCH:
        cfg["moe"] = _moe_config(config, get, n_enc, n_dec)
        capacity = get("expert_capacity")
    return HfModel(flavor, ModelConfig(**cfg), capacity, float(get("dropout_rate")))


_SWITCH_DEFAULTS = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64, num_layers=12,
    num_sparse_encoder_layers=3, num_decoder_layers=12, num_sparse_decoder_layers=3,
    num_heads=12, num_experts=8, router_jitter_noise=0.01, router_dtype="float32",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    router_z_loss_coef=0.001, router_aux_loss_coef=0.001, dense_act_fn="relu",
    tie_word_embeddings=True,
)  # fmt: skip
_T5_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
    num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.1, feed_forward_proj="relu", tie_word_embeddings=True,
)  # fmt: skip


def _getter(config: dict, flavor: str):
    defaults = _SWITCH_DEFAULTS if flavor == SWITCH else _T5_DEFAULTS

    def get(key: str) -> Any:
        return config.get(key, defaults.get(key))

    return get


def _activation(config: dict, flavor: str) -> str:
    if flavor == SWITCH:
        act = config.get("dense_act_fn", "relu")
        if act not in _SWITCH_ACT:
            raise ConfigError(f"config.json dense_act_fn={act!r} is not supported ({_SWITCH_ACT})")
        # The released Switch configs also carry T5's feed_forward_proj / is_gated_act, which HF
        # SwitchTransformers ignores; refuse them when they describe another MLP than ours.
        proj = config.get("feed_forward_proj", act)
        if proj != act or config.get("is_gated_act", False):
            raise ConfigError(
                f"config.json feed_forward_proj={proj!r} / is_gated_act disagree with "
                f"dense_act_fn={act!r} (HF SwitchTransformers has no gated MLP)"
            )
        return _SWITCH_ACT[act]
    proj = config.get("feed_forward_proj", "relu")
    if proj not in _T5_ACT:
        raise ConfigError(f"config.json feed_forward_proj={proj!r} is not supported ({_T5_ACT})")
    return _T5_ACT[proj]


def hf_sparse_layers(num_layers: int, num_sparse: int) -> set[int]:
    """Blocks HF makes sparse (SwitchTransformersStack with config.__post_init__'s step)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return set()
    return {i for i in range(num_layers) if i % step == 1 or step == 1}


def _sparse_every(n_enc: int, n_dec: int, enc: set[int], dec: set[int]) -> int | None:
    for every in range(0, max(n_enc, n_dec) + 1):
        moe = MoeConfig(num_experts=1, sparse_every=every)
        ours_enc = {i for i in range(n_enc) if moe.is_sparse(i)}
        ours_dec = {i for i in range(n_dec) if moe.is_sparse(i)}
        if ours_enc == enc and ours_dec == dec:
            return every
    return None


def _moe_config(config: dict, get, n_enc: int, n_dec: int) -> MoeConfig:
    enc = hf_sparse_layers(n_enc, get("num_sparse_encoder_layers"))
    dec = hf_sparse_layers(n_dec, get("num_sparse_decoder_layers"))
    every = _sparse_every(n_enc, n_dec, enc, dec)
    if every is None:
        raise ConfigError(
            f"config.json num_sparse_encoder_layers / num_sparse_decoder_layers put experts in "
            f"encoder blocks {sorted(enc)} and decoder blocks {sorted(dec)}; switch_jax needs one "
            f"MoeConfig.sparse_every layout (layer i sparse iff i % every == every - 1) for both"
        )
    router_dtype = get("router_dtype")
    if router_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.json router_dtype={router_dtype!r} is not supported")
    return MoeConfig(
        num_experts=get("num_experts"),
        top_k=1,
        sparse_every=every,
        aux_loss_coef=float(get("router_aux_loss_coef")),
        router_z_loss_coef=float(get("router_z_loss_coef")),
        jitter_eps=float(get("router_jitter_noise")),
        router_dtype=router_dtype,
    )


def hf_routing(cfg: ModelConfig, tokens_per_sequence: int, expert_capacity: int) -> ModelConfig:
    """Our MoE grouping set to HF's: one group per sequence, exactly `expert_capacity` slots per
    expert in train and eval. Our padding tokens take no slot; with right padding HF's real tokens
    get the same slots, so routing, drops and outputs match on real tokens."""
    if cfg.moe is None:
        return cfg
    moe = dataclasses.replace(
        cfg.moe,
        group_size=tokens_per_sequence,
        min_capacity=expert_capacity,
        capacity_factor_train=1e-9,  # round(cf * T / E) = 0, so the capacity is min_capacity
        capacity_factor_eval=1e-9,
        num_expert_partitions=1,
    )
    return cfg.replace(moe=moe)


def to_hf(
    cfg: ModelConfig, *, expert_capacity: int = 64, dropout_rate: float | None = None
) -> dict:
    """config.json for `save_pretrained`-style export (Switch when cfg.moe, else T5)."""
    if not cfg.is_encoder_decoder:
        raise ConfigError("ModelConfig.architecture='decoder_only' cannot be exported to HF")
    common = dict(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.d_ff,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate if dropout_rate is None else dropout_rate,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=cfg.tied_logits,
    )
    if cfg.moe is None:
        proj = {"relu": "relu", "geglu": "gated-gelu", "gelu": "gelu_new"}[cfg.activation]
        return dict(
            architectures=["T5ForConditionalGeneration"],
            model_type="t5",
            feed_forward_proj=proj,
            **common,
        )
    if cfg.activation == "geglu":
        raise ConfigError("ModelConfig.activation='geglu': HF SwitchTransformers has no gated MLP")
    moe = cfg.moe
    _check_hf_router(moe)
    n_sparse = [_hf_num_sparse(n, moe) for n in (cfg.num_encoder_layers, cfg.num_decoder_layers)]
    return dict(
        architectures=["SwitchTransformersForConditionalGeneration"],
        model_type="switch_transformers",
        dense_act_fn={"relu": "relu", "gelu": "gelu_new"}[cfg.activation],
        num_experts=moe.num_experts,
        expert_capacity=expert_capacity,
        num_sparse_encoder_layers=n_sparse[0],
        num_sparse_decoder_layers=n_sparse[1],
        router_bias=False,
        router_dtype=moe.router_dtype,
        router_jitter_noise=moe.jitter_eps,
        router_z_loss_coef=moe.router_z_loss_coef,
        router_aux_loss_coef=moe.aux_loss_coef,
        **common,
    )


def _check_hf_router(moe: MoeConfig) -> None:
    """Refuse what HF's router would compute differently: an exported model must route as ours."""
    if moe.top_k != 1:
        raise ConfigError(f"MoeConfig.top_k={moe.top_k}: HF SwitchTransformers routes top-1 only")
    # (A top-1 decoder routes by token choice: ModelConfig allows nothing else there.)
    if moe.routing != "token_choice":
        raise ConfigError(
            f"MoeConfig.routing={moe.routing!r}: HF SwitchTransformers routes by token choice only"
        )
    if moe.loss_free:
        # The bias moves only the choice, not the gate; HF's router_bias moves both.
        raise ConfigError(
            f"MoeConfig.load_balancing={moe.load_balancing!r}: HF SwitchTransformers has no "
            "choice-only routing bias, so the export would route differently"
        )


def _hf_num_sparse(num_layers: int, moe: MoeConfig) -> int:
    ours = {i for i in range(num_layers) if moe.is_sparse(i)}
    for n in range(1, num_layers + 1):
        if hf_sparse_layers(num_layers, n) == ours:
            return n
    raise ConfigError(
        f"MoeConfig.sparse_every={moe.sparse_every} puts experts in layers {sorted(ours)}, "
        f"which HF's num_sparse_*_layers cannot express for {num_layers} layers"
    )
