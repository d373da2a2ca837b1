"""Adafactor with the T5 settings, never factored over expert/layer axes; schedules; accumulation.

Public API:

    layouts = factor_layouts(abstract_params)   # per leaf: 'layers'/'expert' slices, heads x kv
    tx = adafactor(cfg, layouts)                # optax.GradientTransformation
    tx = for_params(cfg, abstract_params)       # the same, with the layouts of those params
    specs = state_logical_specs(cfg, abstract_params)     # opt-state tree of logical P(...)
    schedule = learning_rate_schedule(cfg)                # step -> lr
    grads, aux = accumulate_gradients(grad_fn, params, batch, num_microbatches)

Adafactor here is optax's `scale_by_factored_rms` applied to each *slice* of a parameter: a
parameter with leading 'layers' (scan) and/or 'expert' axes is treated as a stack of independent
matrices (T5X's BATCH factor rule). An expert kernel [E, D, F] thus keeps statistics [E, D] and
[E, F], and update clipping and parameter scaling use each expert's own RMS. A scanned model
therefore gets exactly the updates of the unscanned one. Attention kernels [D, H, K] are factored
as [D, H*K] (T5X's factor rules); optax alone would keep full statistics for them (K=64 < 128).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from switch_jax.config.settings import OptimizerConfig
from switch_jax.models.moe import RouterBias

UNFACTORED_AXES = ("layers", "expert")
MERGED_AXES = ("heads", "kv")  # T5X factor rules: an attention kernel's heads x kv is one column
PARAM_SCALE_EPS = 1e-3  # T5X epsilon2: floor of the parameter RMS in the update scale
FACTORED_EPS = 1e-30  # T5X epsilon1, added to squared gradients


class FactoredStats(NamedTuple):
    """Second-moment statistics of one parameter (optax's layout: unused ones are [..., 1])."""

    v_row: jax.Array
    v_col: jax.Array
    v: jax.Array


class _LeafOut(NamedTuple):
    update: jax.Array
    stats: FactoredStats


class SlicedAdafactorState(NamedTuple):
    count: jax.Array  # int32 updates applied so far (drives the decay schedule)
    stats: Any  # tree like the parameters, one FactoredStats per leaf


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """rsqrt: lr / sqrt(max(step, warmup)) (T5: 0.01 flat for 10k steps); constant: lr."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    warmup = max(cfg.warmup_steps, 1)

    def rsqrt(step):
        return cfg.learning_rate * jax.lax.rsqrt(jnp.maximum(step, warmup).astype(jnp.float32))

    return rsqrt


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def values(tree):
    """Strip nnx Variables (and their metadata) so optax sees plain arrays."""
    return jax.tree.map(lambda x: x.get_value() if _is_var(x) else x, tree, is_leaf=_is_var)


def _leading(axes) -> int:
    n = 0
    while n < len(axes) and axes[n] in UNFACTORED_AXES:
        n += 1
    return n


def _axes(v) -> tuple:
    return tuple((v.get_metadata().get("out_sharding") or ()) if _is_var(v) else ())


def unfactored_leading_dims(abstract_params) -> Any:
    """Per leaf, how many leading axes are 'layers'/'expert' (read from logical axis metadata)."""
    return jax.tree.map(lambda v: _leading(_axes(v)), abstract_params, is_leaf=_is_var)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How Adafactor views one parameter: `lead` leading axes index independent slices, and the
    other dims are merged into `groups` (None: kept as they are) before optax picks the two
    largest to factor. Not a pytree node, so a tree of Layouts mirrors the parameters."""

    lead: int = 0
    groups: tuple[tuple[int, ...], ...] | None = None
    frozen: bool = False  # no update (loss-free balancing's bias: the train step moves it)

    def view_shape(self, shape) -> tuple[int, ...]:
        if self.groups is None:
            return tuple(shape)
        rest = shape[self.lead :]
        return tuple(shape[: self.lead]) + tuple(math.prod(rest[i] for i in g) for g in self.groups)

    def view_axes(self, axes) -> tuple:
        if self.groups is None:
            return tuple(axes)
        return tuple(axes[: self.lead]) + tuple(axes[self.lead + g[0]] for g in self.groups)


def factor_layouts(abstract_params) -> Any:
    """Per leaf Layout from logical axes: slices over 'layers'/'expert', heads x kv merged."""

    def layout(v):
        axes = _axes(v)
        lead = _leading(axes)
        groups: list[list[int]] = []
        for i, axis in enumerate(axes[lead:]):
            prev = axes[lead + i - 1] if i else None
            if groups and axis in MERGED_AXES and prev in MERGED_AXES:
                groups[-1].append(i)
            else:
                groups.append([i])
        return Layout(lead, tuple(tuple(g) for g in groups), isinstance(v, RouterBias))

    return jax.tree.map(layout, abstract_params, is_leaf=_is_var)


def _as_layout(x) -> Layout:
    return x if isinstance(x, Layout) else Layout(int(x))


def _vmap_n(fn: Callable, n: int) -> Callable:
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def scale_by_sliced_adafactor(
    cfg: OptimizerConfig, batch_dims=None
) -> optax.GradientTransformation:
    """Factored RMS scaling + update clipping + parameter scaling, per slice of each leaf.

    Args:
      cfg: decay_rate, factored, min_dim_size_to_factor, clipping_threshold and
        multiply_by_parameter_scale are used.
      batch_dims: tree like the parameters of Layouts (see `factor_layouts`) or of ints (leading
        axes never factored); None: every leaf as is.
    """
    inner = optax.scale_by_factored_rms(
        factored=cfg.factored,
        decay_rate=cfg.decay_rate,
        min_dim_size_to_factor=cfg.min_dim_size_to_factor,
        epsilon=FACTORED_EPS,
    )

    def dims_like(params):
        return jax.tree.map(lambda _: 0, params) if batch_dims is None else batch_dims

    def init_fn(params):
        params = values(params)

        def init_leaf(layout, p):
            layout = _as_layout(layout)
            p = p.reshape(layout.view_shape(p.shape))
            return FactoredStats(*_vmap_n(lambda x: tuple(inner.init(x))[1:], layout.lead)(p))

        stats = jax.tree.map(init_leaf, dims_like(params), params)
        return SlicedAdafactorState(jnp.zeros([], jnp.int32), stats)

    def update_fn(updates, state, params):
        updates, params = values(updates), values(params)

        def slice_update(g, stats, p):
            u, new = inner.update(g, optax.FactoredState(state.count, *stats), p)
            if cfg.clipping_threshold:
                u = u / jnp.maximum(1.0, _rms(u) / cfg.clipping_threshold)
            if cfg.multiply_by_parameter_scale:
                u = u * jnp.maximum(_rms(p), PARAM_SCALE_EPS)
            return _LeafOut(u.astype(g.dtype), FactoredStats(new.v_row, new.v_col, new.v))

        def leaf(layout, g, stats, p):
            layout = _as_layout(layout)
            if layout.frozen:
                return _LeafOut(jnp.zeros_like(g), stats)
            view = layout.view_shape(g.shape)
            out = _vmap_n(slice_update, layout.lead)(g.reshape(view), stats, p.reshape(view))
            return _LeafOut(out.update.reshape(g.shape), out.stats)

        out = jax.tree.map(leaf, dims_like(params), updates, state.stats, params)
        is_out = lambda x: isinstance(x, _LeafOut)  # noqa: E731
        new_updates = jax.tree.map(lambda o: o.update, out, is_leaf=is_out)
        new_stats = jax.tree.map(lambda o: o.stats, out, is_leaf=is_out)
        return new_updates, SlicedAdafactorState(optax.safe_increment(state.count), new_stats)

    return optax.GradientTransformation(init_fn, update_fn)


def adafactor(cfg: OptimizerConfig, batch_dims=None) -> optax.GradientTransformation:
    """T5 Adafactor: factored second moments (decay 0.8), clip 1.0, parameter scale, no momentum,
    learning rate from `learning_rate_schedule(cfg)` on the optimizer's own step count."""
    return optax.chain(
        scale_by_sliced_adafactor(cfg, batch_dims),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
    )


def _factored_dims(shape, factored: bool, min_dim: int) -> tuple[int, int] | None:
    """Mirror of optax's choice: (second largest, largest) dim, if both are >= min_dim."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    if shape[order[-2]] < min_dim:
        return None
    return order[-2], order[-1]


def for_params(cfg: OptimizerConfig, abstract_params) -> optax.GradientTransformation:
    """The run's optimizer: Adafactor with the factor layouts of these (abstract) parameters."""
    return adafactor(cfg, factor_layouts(abstract_params))


def state_logical_specs(cfg: OptimizerConfig, abstract_params, abstract_state=None) -> Any:
    """Logical-axis PartitionSpecs of `for_params(cfg, params).init(params)`; `abstract_state`:
    that state's shapes when the caller has them (else traced here).

    Statistics inherit the axes of the parameter dims they keep, so they shard like the
    parameter (expert statistics over 'expert').
    """
    layouts = factor_layouts(abstract_params)
    if abstract_state is None:
        abstract_state = jax.eval_shape(adafactor(cfg, layouts).init, values(abstract_params))

    def leaf_specs(layout, v):
        n = layout.lead
        axes = layout.view_axes(_axes(v) or (None,) * v.ndim)
        lead, rest = axes[:n], axes[n:]
        dims = _factored_dims(
            layout.view_shape(v.shape)[n:], cfg.factored, cfg.min_dim_size_to_factor
        )
        if dims is None:
            return FactoredStats(P(*lead, None), P(*lead, None), P(*axes))
        d1, d0 = dims  # v_row drops the largest dim d0, v_col the second largest d1
        drop = lambda i: P(*lead, *(a for j, a in enumerate(rest) if j != i))  # noqa: E731
        return FactoredStats(drop(d0), drop(d1), P(*lead, None))

    stats = jax.tree.map(leaf_specs, layouts, abstract_params, is_leaf=_is_var)
    replicated = jax.tree.map(lambda _: P(), abstract_state)
    specs = (SlicedAdafactorState(P(), stats), replicated[1])
    _check_ranks(specs, abstract_state)
    return specs


def _check_ranks(specs, abstract_state) -> None:
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat_state = jax.tree.leaves(abstract_state)
    assert len(flat_specs) == len(flat_state), "optimizer state layout changed: update specs"
    for spec, leaf in zip(flat_specs, flat_state, strict=True):
        assert len(spec) == leaf.ndim, f"spec {spec} does not fit state leaf {leaf.shape}"


def accumulate_gradients(
    grad_fn: Callable,
    params,
    batch: dict,
    num_microbatches: int,
    *,
    split_constraint=None,
    carry_sharding=None,
):
    """Sum `grad_fn(params, microbatch, index) -> (grads, aux)` over microbatches with lax.scan,
    so only one microbatch's activations are alive at a time.

    Microbatch i takes rows i::k, which keeps every microbatch spread over all batch shards
    (contiguous slices would each live on a few devices). `split_constraint` (a sharding of the
    [k, B/k, ...] arrays) and `carry_sharding` (of the gradient sum) pin those layouts.

    Returns (summed grads, aux stacked along a leading [num_microbatches] axis).
    """
    k = num_microbatches
    if k == 1:
        grads, aux = grad_fn(params, batch, jnp.zeros([], jnp.int32))
        return grads, jax.tree.map(lambda x: jnp.asarray(x)[None], aux)

    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        if split_constraint is not None:
            x = jax.lax.with_sharding_constraint(x, split_constraint)
        return x

    def body(acc, inputs):
        microbatch, index = inputs
        grads, aux = grad_fn(params, microbatch, index)
        return jax.tree.map(jnp.add, acc, grads), aux

    zeros = jax.tree.map(jnp.zeros_like, values(params))
    if carry_sharding is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, carry_sharding)
    return jax.lax.scan(body, zeros, (jax.tree.map(split, batch), jnp.arange(k)))
