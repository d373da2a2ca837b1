"""Tiny model configs, jitted forward passes and param-tree helpers shared by the model tests."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from switch_jax.models.config import ModelConfig, MoeConfig
from switch_jax.models.layers import Keys
from switch_jax.models.transformer import Transformer

VOCAB = 64


def tiny_config(**changes) -> ModelConfig:
    """2+2 layers (layer 1 of each stack sparse), 4 experts; small enough to compile in seconds."""
    moe = MoeConfig(num_experts=4, group_size=16, min_capacity=1)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=16,
        d_ff=32,
        num_heads=2,
        head_dim=8,
        num_encoder_layers=2,
        num_decoder_layers=2,
        moe=moe,
    )
    return cfg.replace(**changes)


def make_model(cfg: ModelConfig, seed: int = 0, *, real_init: bool = False) -> Transformer:
    """A model with NumPy-drawn parameters (no XLA compiles for the ~20 init ops: cold-cache
    tests stay fast), or the model's own initialisation with `real_init`.

    NumPy draws: kernels N(0, 1/fan_in), router N(0, 1/d_model) so that routing is varied and
    confident, norms 1 + N(0, 0.1^2) so that a parameter mix-up shows.
    """
    if real_init:
        return Transformer(cfg, rngs=nnx.Rngs(seed))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        name = path[-1]
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(var.shape)
        else:
            if name in ("embedding", "rel_embedding"):
                std = 1.0
            elif axes[-1] == "embed":  # output projections: fan-in is everything but D
                fan_in_axes = ("mlp", "heads", "kv")
            else:
                fan_in_axes = ("embed",)
            if name not in ("embedding", "rel_embedding"):
                dims = zip(var.shape, axes, strict=True)
                fan_in = np.prod([n for n, a in dims if a in fan_in_axes])
                std = 1.0 / np.sqrt(fan_in)
            value = std * rng.standard_normal(var.shape)
        flat["/".join(str(k) for k in path)] = np.asarray(value, var.dtype)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    nnx.update(model, state)
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _forward(graphdef, state, batch, keys, train):
    return nnx.merge(graphdef, state)(batch, train=train, keys=keys)


NO_NOISE = Keys()


def forward(model: Transformer, batch: dict, *, train: bool = False, keys: Keys = NO_NOISE):
    """Jitted `model(batch, ...)`: eager NNX calls take tens of seconds on CPU."""
    graphdef, state = nnx.split(model)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    return _forward(graphdef, state, batch, keys, train)


def random_batch(cfg: ModelConfig, batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    """Unpacked batch without padding; decoder inputs are targets shifted right (BOS = 0)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32)
    out = {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
    }
    if cfg.is_encoder_decoder:
        out["encoder_input_tokens"] = rng.integers(2, cfg.vocab_size, (batch, length)).astype(
            np.int32
        )
    return out


def flat_params(model) -> dict[str, np.ndarray]:
    """{'encoder/blocks/1/layers/0/mlp/router': array, ...} of every nnx.Param."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + "/")
            else:
                flat[path] = np.asarray(value)

    walk(pure, "")
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(int(name) if name.isdigit() else name, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree
