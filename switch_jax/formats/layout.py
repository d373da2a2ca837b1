"""Where each switch_jax parameter lives in HF and T5X checkpoints, and how its array is reshaped.

Legend: D d_model, F d_ff, H heads, K head dim, V vocab, E experts, R relative-position buckets.
Our tree is the unscanned `Transformer` (REFERENCE §2.7 for the HF and T5X names, §2.8 for the
HF converter's mapping). PyTorch `nn.Linear` weights are [out, in], Flax kernels [in, out].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from switch_jax.models.config import ConfigError, ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our parameters and the source tensors it is made of.

    With `stacked`, `sources[j]` is expert j and fills row j of our [E, ...] array; otherwise
    `sources` has one name. `to_ours` maps one source tensor (one expert's when stacked) to our
    layout and `to_source` back.
    """

    path: Path
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_source: Callable[[np.ndarray], np.ndarray]
    stacked: bool = False

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _same(a):
    return a


def _t(a):
    return np.asarray(a).T


def _fold_in(D, H, K):
    # [H*K, D] (torch q/k/v) -> [D, H, K]
    return (lambda a: np.asarray(a).T.reshape(D, H, K)), (lambda x: x.reshape(D, H * K).T)


def _fold_out(D, H, K):
    # [D, H*K] (torch o) -> [H, K, D]
    return (lambda a: np.asarray(a).T.reshape(H, K, D)), (lambda x: x.reshape(H * K, D).T)


def _kernel_in(D, H, K):
    # [D, H*K] (T5X query/key/value kernel, stored flat) -> [D, H, K]
    return (lambda a: np.asarray(a).reshape(D, H, K)), (lambda x: x.reshape(D, H * K))


def _kernel_out(D, H, K):
    # [H*K, D] (T5X out kernel) -> [H, K, D]
    return (lambda a: np.asarray(a).reshape(H, K, D)), (lambda x: x.reshape(H * K, D))


def _layer_paths(cfg: ModelConfig, stack: str, i: int) -> Path:
    return (stack, "blocks", str(i), "layers", "0")


def _check_supported(cfg: ModelConfig) -> None:
    if not cfg.is_encoder_decoder:
        raise ConfigError(
            "ModelConfig.architecture='decoder_only' has no HF / T5X counterpart to convert"
        )


@dataclasses.dataclass(frozen=True)
class Stored:
    """One parameter as our checkpoint stores it: `parts[b]` fills row b of a scanned stack
    (scan_layers: layer b * every + j sits at blocks/layers/j, block b), or is the whole array."""

    path: Path
    shape: tuple[int, ...]
    parts: tuple[Entry, ...]
    scanned: bool


def stored(cfg: ModelConfig, entries: Iterator[Entry]) -> list[Stored]:
    """Group per-layer entries the way `Transformer` lays out its parameters for `cfg`."""
    entries = list(entries)
    if not cfg.scan_layers:
        return [Stored(e.path, e.shape, (e,), False) for e in entries]
    every = cfg.moe.sparse_every if (cfg.moe and cfg.moe.sparse_every) else 1
    groups: dict[Path, list[tuple[int, Entry]]] = {}
    out: list = []
    for e in entries:
        if len(e.path) > 4 and e.path[1] == "blocks":
            block, j = divmod(int(e.path[2]), every)
            key = (e.path[0], "blocks", "layers", str(j), *e.path[5:])
            if key not in groups:
                groups[key] = []
                out.append(key)
            groups[key].append((block, e))
        else:
            out.append(e)
    result = []
    for item in out:
        if isinstance(item, Entry):
            result.append(Stored(item.path, item.shape, (item,), False))
            continue
        parts = tuple(e for _, e in sorted(groups[item], key=lambda be: be[0]))
        result.append(Stored(item, (len(parts), *parts[0].shape), parts, True))
    return result


def hf_entries(cfg: ModelConfig, flavor: str) -> Iterator[Entry]:
    """Entries in HF names; `flavor` is 'switch' (SwitchTransformers) or 't5' (T5 / T5.1.1)."""
    _check_supported(cfg)
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    V, R = cfg.vocab_size, cfg.relative_buckets
    if flavor == "switch" and cfg.activation == "geglu":
        raise ConfigError("ModelConfig.activation='geglu': HF SwitchTransformers has no gated MLP")
    yield Entry(("token_embedder", "embedding"), (V, D), ("shared.weight",), _same, _same)
    if not cfg.tied_logits:
        yield Entry(("logits_dense",), (D, V), ("lm_head.weight",), _t, _t)
    fold_in, unfold_in = _fold_in(D, H, K)
    fold_out, unfold_out = _fold_out(D, H, K)
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        yield Entry((stack, "relpos_bias", "rel_embedding"), (H, R), (bias,), _t, _t)
        yield Entry(
            (stack, "final_norm", "scale"),
            (D,),
            (f"{stack}.final_layer_norm.weight",),
            _same,
            _same,
        )
        for i in range(n):
            ours = _layer_paths(cfg, stack, i)
            hf = f"{stack}.block.{i}.layer"

            def attention(our_name, hf_name, ours=ours):
                for q, proj in (("query", "q"), ("key", "k"), ("value", "v")):
                    yield Entry(
                        ours + (our_name, q),
                        (D, H, K),
                        (f"{hf_name}.{proj}.weight",),
                        fold_in,
                        unfold_in,
                    )
                yield Entry(
                    ours + (our_name, "out"),
                    (H, K, D),
                    (f"{hf_name}.o.weight",),
                    fold_out,
                    unfold_out,
                )

            yield Entry(
                ours + ("pre_self_attention_norm", "scale"),
                (D,),
                (f"{hf}.0.layer_norm.weight",),
                _same,
                _same,
            )
            yield from attention("self_attention", f"{hf}.0.SelfAttention")
            ff = 1
            if stack == "decoder":
                ff = 2
                yield Entry(
                    ours + ("pre_cross_attention_norm", "scale"),
                    (D,),
                    (f"{hf}.1.layer_norm.weight",),
                    _same,
                    _same,
                )
                yield from attention("cross_attention", f"{hf}.1.EncDecAttention")
            yield Entry(
                ours + ("pre_mlp_norm", "scale"),
                (D,),
                (f"{hf}.{ff}.layer_norm.weight",),
                _same,
                _same,
            )
            yield from _hf_mlp(cfg, flavor, ours + ("mlp",), f"{hf}.{ff}", sparse=cfg.is_sparse(i))


def _hf_mlp(cfg: ModelConfig, flavor: str, ours: Path, hf: str, *, sparse: bool) -> Iterator[Entry]:
    D, F = cfg.d_model, cfg.d_ff
    if sparse:
        E = cfg.moe.num_experts
        yield Entry(ours + ("router",), (D, E), (f"{hf}.mlp.router.classifier.weight",), _t, _t)
        for name, shape in (("wi", (E, D, F)), ("wo", (E, F, D))):
            experts = tuple(f"{hf}.mlp.experts.expert_{j}.{name}.weight" for j in range(E))
            yield Entry(ours + (name,), shape, experts, _t, _t, stacked=True)
        return
    module = f"{hf}.mlp" if flavor == "switch" else f"{hf}.DenseReluDense"
    if cfg.activation == "geglu":  # gelu(x wi_0) * (x wi_1): wi_0 is our gate
        yield Entry(ours + ("wi",), (D, F), (f"{module}.wi_1.weight",), _t, _t)
        yield Entry(ours + ("wi_gate",), (D, F), (f"{module}.wi_0.weight",), _t, _t)
    else:
        yield Entry(ours + ("wi",), (D, F), (f"{module}.wi.weight",), _t, _t)
    yield Entry(ours + ("wo",), (F, D), (f"{module}.wo.weight",), _t, _t)


def t5x_entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Entries in T5X / flaxformer names ('/'-joined paths under the checkpoint's `target`)."""
    _check_supported(cfg)
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    V, R = cfg.vocab_size, cfg.relative_buckets
    yield Entry(
        ("token_embedder", "embedding"), (V, D), ("token_embedder/embedding",), _same, _same
    )
    if not cfg.tied_logits:
        yield Entry(("logits_dense",), (D, V), ("decoder/logits_dense/kernel",), _same, _same)
    k_in, k_in_inv = _kernel_in(D, H, K)
    k_out, k_out_inv = _kernel_out(D, H, K)
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        yield Entry(
            (stack, "relpos_bias", "rel_embedding"),
            (H, R),
            (f"{stack}/relpos_bias/rel_embedding",),
            _same,
            _same,
        )
        yield Entry(
            (stack, "final_norm", "scale"), (D,), (f"{stack}/{stack}_norm/scale",), _same, _same
        )
        for i in range(n):
            ours = _layer_paths(cfg, stack, i)
            t5x = f"{stack}/layers_{i}"

            def attention(our_name, t5x_name, ours=ours):
                for q in ("query", "key", "value"):
                    yield Entry(
                        ours + (our_name, q), (D, H, K), (f"{t5x_name}/{q}/kernel",), k_in, k_in_inv
                    )
                yield Entry(
                    ours + (our_name, "out"),
                    (H, K, D),
                    (f"{t5x_name}/out/kernel",),
                    k_out,
                    k_out_inv,
                )

            self_norm = (
                "pre_attention_layer_norm"
                if stack == "encoder"
                else "pre_self_attention_layer_norm"
            )
            self_attention = "attention" if stack == "encoder" else "self_attention"
            yield Entry(
                ours + ("pre_self_attention_norm", "scale"),
                (D,),
                (f"{t5x}/{self_norm}/scale",),
                _same,
                _same,
            )
            yield from attention("self_attention", f"{t5x}/{self_attention}")
            if stack == "decoder":
                yield Entry(
                    ours + ("pre_cross_attention_norm", "scale"),
                    (D,),
                    (f"{t5x}/pre_cross_attention_layer_norm/scale",),
                    _same,
                    _same,
                )
                yield from attention("cross_attention", f"{t5x}/encoder_decoder_attention")
            yield Entry(
                ours + ("pre_mlp_norm", "scale"),
                (D,),
                (f"{t5x}/pre_mlp_layer_norm/scale",),
                _same,
                _same,
            )
            yield from _t5x_mlp(cfg, ours + ("mlp",), f"{t5x}/mlp", sparse=cfg.is_sparse(i))


def _t5x_mlp(cfg: ModelConfig, ours: Path, t5x: str, *, sparse: bool) -> Iterator[Entry]:
    D, F = cfg.d_model, cfg.d_ff
    lead: tuple[int, ...] = ()
    module = t5x
    if sparse:
        E = cfg.moe.num_experts
        yield Entry(
            ours + ("router",), (D, E), (f"{t5x}/router/router_weights/w/kernel",), _same, _same
        )
        lead, module = (E,), f"{t5x}/expert"
    if cfg.activation == "geglu":  # flaxformer activations ('gelu', 'linear'): wi_0 is the gate
        yield Entry(ours + ("wi",), lead + (D, F), (f"{module}/wi_1/kernel",), _same, _same)
        yield Entry(ours + ("wi_gate",), lead + (D, F), (f"{module}/wi_0/kernel",), _same, _same)
    else:
        yield Entry(ours + ("wi",), lead + (D, F), (f"{module}/wi/kernel",), _same, _same)
    yield Entry(ours + ("wo",), lead + (F, D), (f"{module}/wo/kernel",), _same, _same)
