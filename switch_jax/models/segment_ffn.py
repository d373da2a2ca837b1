"""The expert FFN over exactly the kept rows: grouped_matmul='fused'.

Rows arrive sorted by expert (segment e holds sizes_E[e] rows, then rows that are not
computed). A loop over experts runs each segment's whole FFN (wi, activation, dropout, wo)
with that expert's kernels, one block of rows at a time: full blocks of `block` rows while
they fit (a loop whose trip count is the segment's size), then the rest in at most one block
of each power of two from block down to block/8. In inference an expert without rows is
skipped (its kernels are not even sliced). The matmuls cover the kept rows, each segment
rounded up to a multiple of the smallest block, not capacity slots or a worst-case block count,
and the [rows, d_ff] activations are never gathered or copied around the experts. XLA cannot
differentiate a loop whose trip count is data, so the backward is written here: the same
blocks, with the pre-activations saved by the forward, accumulating each expert's kernel
gradients in float32.

A block may run past its segment by less than the smallest block. In the forward it writes rows
of later segments (which their own blocks overwrite afterwards, experts going in order) or
rows after the last segment (zeroed at the end); in the backward its foreign rows get a zero
cotangent, so they add nothing to the kernel gradients.

Legend: R rows, D d_model, F d_ff, E experts, b block rows, s rows of one block,
Rp = R + b (padded rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def compute_dtype(dtype):
    """On CPU the blocks compute in float32 whatever the activation dtype: XLA:CPU ran
    bfloat16 matmuls inside these loops ~1.5x slower than float32 ones (docs/benchmarks.md
    §8); the outputs are cast back to the input's dtype. Elsewhere, the input's dtype."""
    return jnp.float32 if jax.default_backend() == "cpu" else dtype


# post(a_sF, g_sF or None, keep_sF or None) -> h_sF: activation then dropout of one block.
Post = Callable[[jax.Array, jax.Array | None, jax.Array | None], jax.Array]


def segment_ffn(x_RD, sizes_E, wi_EDF, wg_EDF, wo_EFD, keep_RF, post: Post, block: int):
    """y[r] = post(x[r] wi[e], x[r] wg[e], keep[r]) wo[e] for the rows r of segment e; the
    rows after the last segment are 0. `wg` (GEGLU's gate kernel) and `keep` (the dropout
    mask, drawn over [R, F] by the caller) may be None. `block` is rounded down to a power
    of two; the smallest tail block is block/8 (measured best on CPU, docs/benchmarks.md)."""
    R = x_RD.shape[0]
    b = _pow2_at_most(max(1, min(block, R)))
    sizes = _block_sizes(b, max(1, b // 8))
    pad = lambda t: None if t is None else jnp.pad(t, ((0, b), (0, 0)))  # noqa: E731
    y_pD = _segment_ffn(pad(x_RD), sizes_E, wi_EDF, wg_EDF, wo_EFD, pad(keep_RF), post, sizes)
    rows_in_segments = (jnp.arange(R) < jnp.sum(sizes_E))[:, None]
    return jnp.where(rows_in_segments, y_pD[:R], 0).astype(y_pD.dtype)


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _block_sizes(b: int, smallest: int) -> tuple[int, ...]:
    """(b, b/2, ..., smallest): the full block, then the tail's powers of two."""
    sizes = [b]
    while sizes[-1] // 2 >= max(smallest, 1):
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def _over_segment(start, size, sizes: tuple[int, ...], block_fn, carry):
    """block_fn(r0, s, carry) over the blocks covering rows [start, start + size): full
    blocks of sizes[0], then one block of s for each set bit of the rest rounded up to a
    multiple of sizes[-1]."""
    b, smallest = sizes[0], sizes[-1]
    full = size // b
    carry = jax.lax.fori_loop(0, full, lambda i, c: block_fn(start + i * b, b, c), carry)
    rest = (size - full * b + smallest - 1) // smallest * smallest  # <= b
    r0 = start + full * b
    for s in sizes:
        on = (rest & s) != 0
        carry = jax.lax.cond(on, functools.partial(block_fn, r0, s), lambda c: c, carry)
        r0 = r0 + jnp.where(on, s, 0)
    return carry


def _varying(t) -> set[str]:
    """The shard_map axes over which `t` differs between shards (empty outside shard_map)."""
    return set(jax.typeof(t).manual_axis_type.varying)


def _zeros(shape, dtype, *like):
    """Zeros that vary over the same shard_map axes as `like` (a loop carry must keep its
    type, and the blocks' results vary wherever their inputs do)."""
    z = jnp.zeros(shape, dtype)
    vma = set().union(*(_varying(t) for t in like if t is not None))
    return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _cotangent_for(g, primal):
    """`g` summed over the shard_map axes where it varies and `primal` does not: an input
    that every shard shares gets the sum of the shards' cotangents (as autodiff's psum)."""
    extra = _varying(g) - _varying(primal)
    return jax.lax.psum(g, tuple(sorted(extra))) if extra else g


def _take(t, r0, s):
    return None if t is None else jax.lax.dynamic_slice_in_dim(t, r0, s)


def _put(buf, rows, r0):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), r0, 0)


def _cast(w, dtype):
    return None if w is None else w.astype(dtype)


def _forward(x_pD, sizes_E, wi, wg, wo, keep_pF, post, sizes, save: bool):
    """(y_pD, a_pF, g_pF): the outputs and, with `save`, the pre-activations."""
    Rp, D = x_pD.shape
    start_E = jnp.cumsum(sizes_E) - sizes_E
    cdt = compute_dtype(x_pD.dtype)

    def expert(carry, start, size, kernels):
        wi_e, wg_e, wo_e = kernels

        def block(r0, s, carry):
            y, a_buf, g_buf = carry
            x_s = _take(x_pD, r0, s).astype(cdt)
            a = x_s @ wi_e
            g = None if wg is None else x_s @ wg_e
            h = post(a, g, _take(keep_pF, r0, s))
            y = _put(y, h @ wo_e, r0)
            if save:
                a_buf = _put(a_buf, a, r0)
                g_buf = None if g is None else _put(g_buf, g, r0)
            return y, a_buf, g_buf

        return _over_segment(start, size, sizes, block, carry), None

    F = wi.shape[-1]
    inputs = (x_pD, wi, wg, wo, keep_pF)
    empty = lambda on: _zeros((Rp, F), cdt, *inputs) if on else None  # noqa: E731
    carry = (_zeros((Rp, D), x_pD.dtype, *inputs), empty(save), empty(save and wg is not None))
    if save:
        # Training: each expert's kernels come from the scan (every expert has rows in
        # practice, and a branch around each expert measured ~3 % slower on CPU).
        def body(carry, per_expert):
            start, size, *kernels = per_expert
            return expert(carry, start, size, tuple(_cast(w, cdt) for w in kernels))

        return jax.lax.scan(body, carry, (start_E, sizes_E, wi, wg, wo))[0]

    # Inference: an expert without rows is skipped before its kernels are sliced; XLA:CPU
    # copies a slice before a matmul reads it, and decoding a few tokens leaves many experts
    # without rows.
    def skip_or_run(carry, per_expert):
        start, size, e = per_expert

        def run(carry):
            kernels = (
                None if w is None else jax.lax.dynamic_index_in_dim(w, e, 0, False)
                for w in (wi, wg, wo)
            )
            return expert(carry, start, size, tuple(_cast(w, cdt) for w in kernels))

        return jax.lax.cond(size > 0, run, lambda c: (c, None), carry)

    ids_E = jnp.arange(sizes_E.shape[0], dtype=sizes_E.dtype)
    return jax.lax.scan(skip_or_run, carry, (start_E, sizes_E, ids_E))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _segment_ffn(x_pD, sizes_E, wi, wg, wo, keep_pF, post, sizes):
    return _forward(x_pD, sizes_E, wi, wg, wo, keep_pF, post, sizes, save=False)[0]


def _segment_ffn_fwd(x_pD, sizes_E, wi, wg, wo, keep_pF, post, sizes):
    y, a_buf, g_buf = _forward(x_pD, sizes_E, wi, wg, wo, keep_pF, post, sizes, save=True)
    return y, (x_pD, sizes_E, wi, wg, wo, keep_pF, a_buf, g_buf)


def _xt_dy(u, v):
    """u^T v over a block's rows, accumulated in float32."""
    dims = (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(u, v, dims, preferred_element_type=jnp.float32)


def _segment_ffn_bwd(post, sizes, res, dy_pD):
    x_pD, sizes_E, wi, wg, wo, keep_pF, a_buf, g_buf = res
    E, D, F = wi.shape
    start_E = jnp.cumsum(sizes_E) - sizes_E
    cdt = compute_dtype(x_pD.dtype)
    inputs = (x_pD, wi, wg, wo, keep_pF, dy_pD)
    zeros32 = lambda shape, on=True: _zeros(shape, jnp.float32, *inputs) if on else None  # noqa: E731

    def expert(dx, per_expert):
        start, size, wi_e, wg_e, wo_e = per_expert
        wi_e, wg_e, wo_e = (None if w is None else w.astype(cdt) for w in (wi_e, wg_e, wo_e))
        end = start + size

        def block(r0, s, acc):
            dx, gwi, gwg, gwo = acc
            mine = (r0 + jnp.arange(s) < end)[:, None]
            dy = jnp.where(mine, _take(dy_pD, r0, s), 0).astype(cdt)
            x_s, keep = _take(x_pD, r0, s).astype(cdt), _take(keep_pF, r0, s)
            h, post_vjp = jax.vjp(
                lambda a, g: post(a, g, keep), _take(a_buf, r0, s), _take(g_buf, r0, s)
            )
            gwo = gwo + _xt_dy(h, dy)
            da, dg = post_vjp((dy @ wo_e.T).astype(h.dtype))
            dx_s = da @ wi_e.T
            gwi = gwi + _xt_dy(x_s, da)
            if wg is not None:
                dx_s = dx_s + dg @ wg_e.T
                gwg = gwg + _xt_dy(x_s, dg)
            return _put(dx, dx_s, r0), gwi, gwg, gwo

        acc = (dx, zeros32((D, F)), zeros32((D, F), wg is not None), zeros32((F, D)))
        dx, gwi, gwg, gwo = _over_segment(start, size, sizes, block, acc)
        return dx, (gwi, gwg, gwo)

    # The scan stacks each expert's kernel gradients: no [E, D, F] accumulator to update.
    dx, (dwi, dwg, dwo) = jax.lax.scan(
        expert, _zeros(x_pD.shape, x_pD.dtype, *inputs), (start_E, sizes_E, wi, wg, wo)
    )
    cast = lambda g, w: None if w is None else _cotangent_for(g.astype(w.dtype), w)  # noqa: E731
    float0 = lambda t: None if t is None else jnp.zeros(t.shape, jax.dtypes.float0)  # noqa: E731
    dx = cast(dx, x_pD)
    return dx, float0(sizes_E), cast(dwi, wi), cast(dwg, wg), cast(dwo, wo), float0(keep_pF)


_segment_ffn.defvjp(_segment_ffn_fwd, _segment_ffn_bwd)
