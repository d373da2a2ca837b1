"""Typed, frozen model configuration: the only objects gin binds inside `models/`."""

from __future__ import annotations

import dataclasses
from typing import Literal

Activation = Literal["relu", "geglu", "gelu"]
# 'auto' resolves per platform (models/moe.resolve_dispatch): einsum on TPU, the fastest measured
# path elsewhere (docs/benchmarks.md): 'sorted' (the fused FFN over the kept rows) on CPU.
Dispatch = Literal["auto", "einsum", "scatter", "sorted", "dropless"]
DISPATCHES = ("auto", "einsum", "scatter", "sorted", "dropless")
GroupedMatmul = Literal["auto", "ragged_dot", "blocked", "fused"]
GROUPED_MATMULS = ("auto", "ragged_dot", "blocked", "fused")
LayerReduction = Literal["mean", "sum"]
RngImpl = Literal["threefry", "rbg", "unsafe_rbg"]
Architecture = Literal["encoder_decoder", "decoder_only"]
# How tokens meet experts (docs/architecture.md, "Routing methods"): 'token_choice' is each
# token's top_k experts (top_k=2 is flaxformer's top-2); 'mesh_tf_top2' is Mesh TF's top-2 of
# the paper's Table 1 MoE baseline; 'expert_choice' has each expert take its top-C tokens.
RoutingMethod = Literal["token_choice", "mesh_tf_top2", "expert_choice"]
ROUTINGS = ("token_choice", "mesh_tf_top2", "expert_choice")
CAUSAL_ROUTINGS = ("token_choice", "mesh_tf_top2")
LoadBalancing = Literal["aux_loss", "loss_free", "both"]
# Mesh TF's moe_second_policy_{train,eval}: when the second expert of 'mesh_tf_top2' is used.
SecondPolicy = Literal["all", "none", "threshold", "random"]
SECOND_POLICIES = ("all", "none", "threshold", "random")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Switch / MoE feed-forward settings (REFERENCE Part 3.1 and 1.8).

    Defaults follow the released Switch-Base checkpoints; `jitter_eps=1e-2` is the paper's
    multiplicative input jitter (the released T5X runs had none).
    """

    num_experts: int = 8
    top_k: int = 1  # 1 = Switch routing; 2 = flaxformer's top-2, not Table 1's MoE (see docs)
    # A layer i is sparse iff i % sparse_every == sparse_every - 1 (flaxformer's MIXED layout:
    # 2 -> layers 1, 3, 5, ...; 1 -> every layer; 0 -> no sparse layer).
    sparse_every: int = 2
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    group_size: int = 8192
    # Groups must also be a multiple of this (the expert-parallel partition count), so that each
    # expert shard receives whole groups; partitioning sets it from the mesh.
    num_expert_partitions: int = dataclasses.field(default=1, metadata={"resumable": True})
    aux_loss_coef: float = 1e-2
    router_z_loss_coef: float = 0.0
    jitter_eps: float = 0.0
    router_init_stddev: float = 2e-2
    expert_dropout_rate: float = 0.0
    dispatch: Dispatch = "auto"
    # How 'sorted' / 'dropless' run the experts on their sorted rows: jax.lax.ragged_dot
    # (GPU/TPU), dense matmuls over padded per-expert segments ('blocked'), or the whole expert
    # FFN over exactly the kept rows of each expert, block by block ('fused', models/segment_ffn).
    grouped_matmul: GroupedMatmul = "auto"
    # Rows per segment block of 'dropless' with grouped_matmul='blocked'.
    dropless_block_size: int = 128
    # Rows per full block of grouped_matmul='fused' (a power of two; tails go down to 1/8 of it).
    fused_block_size: int = 512
    # How the per-layer aux and router z losses are combined over the sparse layers: 'mean' as
    # T5X's code (and our default), 'sum' as the paper's Mesh TF code.
    aux_loss_reduction: LayerReduction = "mean"
    batch_prioritized_routing: bool = False
    router_dtype: str = "float32"
    routing: RoutingMethod = "token_choice"
    # The decoder stacks' routing (None: `routing`); 'expert_choice' is not causal, so an
    # encoder-decoder with expert-choice encoders routes its decoder with 'token_choice'.
    decoder_routing: RoutingMethod | None = None
    # 'aux_loss': the Switch auxiliary loss (aux_loss_coef); 'loss_free': a per-expert bias on
    # the logits of the top-k choice, moved by bias_update_rate * sign(mean load - load) after
    # every train step (DeepSeek-V3), and no aux loss in the loss; 'both': bias and aux loss.
    load_balancing: LoadBalancing = "aux_loss"
    bias_update_rate: float = 1e-3
    # mesh_tf_top2 only: Mesh TF's defaults ('random': keep the second expert with probability
    # min(1, gate_2 / threshold), gates renormalised over the two).
    second_expert_policy_train: SecondPolicy = "random"
    second_expert_policy_eval: SecondPolicy = "random"
    second_expert_threshold: float = 0.2
    # Sow each token's routing into nnx.Intermediate (MoeLayer docstring); off for training.
    sow_routing: bool = False

    def __post_init__(self):
        _require(self.num_experts >= 1, "MoeConfig.num_experts must be >= 1")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"MoeConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]",
        )
        _require(self.sparse_every >= 0, "MoeConfig.sparse_every must be >= 0")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            value = getattr(self, name)
            _require(value > 0, f"MoeConfig.{name}={value} must be > 0")
        _require(self.min_capacity >= 0, "MoeConfig.min_capacity must be >= 0")
        _require(self.group_size >= 1, "MoeConfig.group_size must be >= 1")
        _require(self.num_expert_partitions >= 1, "MoeConfig.num_expert_partitions must be >= 1")
        _require(0 <= self.jitter_eps < 1, "MoeConfig.jitter_eps must be in [0, 1)")
        _require(0 <= self.expert_dropout_rate < 1, "MoeConfig.expert_dropout_rate in [0, 1)")
        _require(
            self.dispatch in DISPATCHES,
            f"MoeConfig.dispatch={self.dispatch!r} must be one of {'|'.join(DISPATCHES)}",
        )
        _require(
            self.grouped_matmul in GROUPED_MATMULS,
            f"MoeConfig.grouped_matmul={self.grouped_matmul!r} must be one of "
            f"{'|'.join(GROUPED_MATMULS)}",
        )
        _require(self.dropless_block_size >= 1, "MoeConfig.dropless_block_size must be >= 1")
        _require(self.fused_block_size >= 1, "MoeConfig.fused_block_size must be >= 1")
        _require(
            self.aux_loss_reduction in ("mean", "sum"),
            f"MoeConfig.aux_loss_reduction={self.aux_loss_reduction!r} must be 'mean' or 'sum'",
        )
        _require(
            self.router_dtype in ("float32", "bfloat16"),
            f"MoeConfig.router_dtype={self.router_dtype!r} must be 'float32' or 'bfloat16'",
        )
        self._check_routing()

    def _check_routing(self) -> None:
        for name in ("routing", "decoder_routing"):
            value = getattr(self, name)
            _require(
                value in ROUTINGS or (name == "decoder_routing" and value is None),
                f"MoeConfig.{name}={value!r} must be one of {'|'.join(ROUTINGS)}",
            )
        _require(
            self.load_balancing in ("aux_loss", "loss_free", "both"),
            f"MoeConfig.load_balancing={self.load_balancing!r} must be aux_loss|loss_free|both",
        )
        _require(self.bias_update_rate >= 0, "MoeConfig.bias_update_rate must be >= 0")
        for name in ("second_expert_policy_train", "second_expert_policy_eval"):
            value = getattr(self, name)
            _require(
                value in SECOND_POLICIES,
                f"MoeConfig.{name}={value!r} must be one of {'|'.join(SECOND_POLICIES)}",
            )
        _require(self.second_expert_threshold > 0, "MoeConfig.second_expert_threshold must be > 0")
        methods = {self.routing, self.decoder_routing or self.routing}
        if "mesh_tf_top2" in methods:
            _require(
                self.top_k == 2,
                f"MoeConfig.routing='mesh_tf_top2' is a top-2 router: set MoeConfig.top_k=2 "
                f"(got {self.top_k})",
            )
        elif (
            self.second_expert_policy_train != "random"
            or self.second_expert_policy_eval != "random"
            or self.second_expert_threshold != 0.2
        ):
            raise ConfigError(
                "MoeConfig.second_expert_policy_*/second_expert_threshold apply only to "
                "routing='mesh_tf_top2': remove them or set MoeConfig.routing='mesh_tf_top2'"
            )
        if "expert_choice" in methods:
            _check_expert_choice(self)
        if self.load_balancing == "aux_loss":
            return
        _require(
            self.routing != "expert_choice",
            "MoeConfig.load_balancing='loss_free'/'both' biases the tokens' choice; "
            "routing='expert_choice' is balanced by construction: set load_balancing='aux_loss'",
        )

    def stack_routing(self, causal: bool) -> str:
        """The routing method of an encoder (`causal=False`) or decoder stack."""
        return (self.decoder_routing or self.routing) if causal else self.routing

    @property
    def loss_free(self) -> bool:
        """Whether the router keeps a per-expert choice bias (load_balancing loss_free/both)."""
        return self.load_balancing in ("loss_free", "both")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` (0-based, within its stack) has a Switch FFN."""
        return self.sparse_every > 0 and layer % self.sparse_every == self.sparse_every - 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """T5.1.1-style transformer; `moe=None` gives the dense T5 baseline."""

    architecture: Architecture = "encoder_decoder"
    vocab_size: int = 32128
    d_model: int = 768
    d_ff: int = 3072
    num_heads: int = 12
    head_dim: int = 64
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    activation: Activation = "relu"
    tied_logits: bool = True
    dropout_rate: float = 0.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    dtype: str = "bfloat16"  # activations
    param_dtype: str = "float32"
    # Truncated normal with sigma = sqrt(init_scale / fan_in) for every kernel (paper Table 3).
    init_scale: float = 0.1
    embedding_init_stddev: float = 1.0
    # Relative-position bias table: variance-scaling(scale, fan_avg, uniform). 0.1 is T5X's MoE
    # configs (moe.gin's SCALE, set to 0.1 by tokens_choose_base.gin); T5.1.1 dense uses 1.0.
    relative_bias_init_scale: float = 0.1
    scan_layers: bool = False
    z_loss: float = 1e-4  # output-logits z-loss coefficient (T5X's EncoderDecoderModel z_loss)
    # PRNG of the dropout and jitter noise: 'threefry' (identical on every mesh), or XLA's
    # RngBitGenerator ('rbg', 'unsafe_rbg', as T5X offers): much cheaper per draw, but the
    # noise then depends on the mesh and the compiler. The saved train-state key is threefry
    # either way.
    rng_impl: RngImpl = "threefry"
    moe: MoeConfig | None = dataclasses.field(default_factory=MoeConfig)

    def __post_init__(self):
        _require(
            self.architecture in ("encoder_decoder", "decoder_only"),
            f"ModelConfig.architecture={self.architecture!r} must be encoder_decoder|decoder_only",
        )
        for name in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim"):
            value = getattr(self, name)
            _require(value >= 1, f"ModelConfig.{name}={value} must be >= 1")
        _require(self.num_decoder_layers >= 1, "ModelConfig.num_decoder_layers must be >= 1")
        if self.architecture == "encoder_decoder":
            _require(self.num_encoder_layers >= 1, "ModelConfig.num_encoder_layers must be >= 1")
        _require(
            self.activation in ("relu", "geglu", "gelu"),
            f"ModelConfig.activation={self.activation!r} must be relu|geglu|gelu",
        )
        _require(0 <= self.dropout_rate < 1, "ModelConfig.dropout_rate must be in [0, 1)")
        _require(self.init_scale > 0, "ModelConfig.init_scale must be > 0")
        _require(self.z_loss >= 0, "ModelConfig.z_loss must be >= 0")
        _require(
            self.relative_bias_init_scale > 0, "ModelConfig.relative_bias_init_scale must be > 0"
        )
        _require(
            self.rng_impl in ("threefry", "rbg", "unsafe_rbg"),
            f"ModelConfig.rng_impl={self.rng_impl!r} must be threefry|rbg|unsafe_rbg",
        )
        _require(
            not (
                self.architecture == "decoder_only"
                and self.moe is not None
                and self.moe.batch_prioritized_routing
            ),
            "MoeConfig.batch_prioritized_routing would let later tokens decide whether earlier "
            "ones are dropped; a decoder ignores it, so a decoder_only model cannot use it",
        )
        if self.moe is not None:
            self._check_stack_routing(self.moe)
        if self.scan_layers and self.moe is not None and self.moe.sparse_every > 0:
            for n in self.stack_depths():
                _require(
                    n % self.moe.sparse_every == 0,
                    f"scan_layers needs layer counts divisible by sparse_every="
                    f"{self.moe.sparse_every}, got {n}",
                )

    def _check_stack_routing(self, moe: MoeConfig) -> None:
        if not self.is_encoder_decoder and moe.routing == "expert_choice":
            raise ConfigError(
                "MoeConfig.routing='expert_choice' is not causal and a decoder_only model has "
                "no encoder to use it in: set MoeConfig.routing='token_choice'"
            )
        if moe.stack_routing(causal=True) == "expert_choice":
            # A decoder token's expert would depend on later tokens of its group.
            if not self.is_encoder_decoder:
                fix = "set MoeConfig.routing='token_choice' (a decoder_only model)"
            else:
                fix = "set MoeConfig.decoder_routing='token_choice'"
            name = "decoder_routing" if moe.decoder_routing else "routing"
            raise ConfigError(
                f"MoeConfig.{name}='expert_choice' is not causal and cannot route a decoder "
                f"stack: {fix}"
            )
        _require(
            not (moe.sow_routing and self.scan_layers),
            "MoeConfig.sow_routing cannot see inside scanned layers: set "
            "ModelConfig.scan_layers=False to read per-token routing",
        )

    @property
    def is_encoder_decoder(self) -> bool:
        """True for T5's encoder-decoder, False for a decoder-only model."""
        return self.architecture == "encoder_decoder"

    def stack_depths(self) -> tuple[int, ...]:
        """Layer count of each stack: (encoder, decoder), or (decoder,) for decoder-only."""
        if self.is_encoder_decoder:
            return (self.num_encoder_layers, self.num_decoder_layers)
        return (self.num_decoder_layers,)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` of a stack has a Switch FFN (never for a dense model)."""
        return self.moe is not None and self.moe.is_sparse(layer)

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes` applied (and validated again)."""
        return dataclasses.replace(self, **changes)


def _check_expert_choice(moe: MoeConfig) -> None:
    """What expert choice cannot be combined with, each refused in one line."""
    _require(
        moe.dispatch != "dropless",
        "MoeConfig.routing='expert_choice' fills each expert's capacity C; dispatch='dropless' "
        "has none: use dispatch='einsum'|'scatter'|'sorted'|'auto'",
    )
    _require(
        moe.top_k == 1,
        f"MoeConfig.top_k={moe.top_k} does not apply to routing='expert_choice' (each expert "
        f"picks its tokens): leave top_k=1",
    )
    _require(
        not moe.batch_prioritized_routing,
        "MoeConfig.batch_prioritized_routing does not apply to routing='expert_choice' "
        "(experts pick tokens by probability already): set it False",
    )


class ConfigError(ValueError):
    """A user setting is invalid; the message names the setting to change."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
