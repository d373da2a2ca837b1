"""Sorted-row dispatch: assignments sorted by expert, experts as one grouped matmul.

`sorted` keeps capacity (exactly the einsum / scatter function); `dropless` has none. Rows move
only through gathers whose backward is the inverse gather (no scatter-add: XLA:CPU runs those
serially). Under a mesh the row work runs per batch shard in `shard_map`, so no token leaves
its shard except through the expert all-to-all.

Legend: G groups, T tokens per group, N tokens of a shard (or any rows a gather reads), M rows
a gather writes, D d_model, F d_ff, E experts, P experts per token (the top-k picks),
A = N*P (or T*P) assignments, R sorted rows, X expert shards, C capacity, Z = E*C slots,
J blocks of b rows (so M = J*b in the blocked matmul).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd

# --------------------------------------------------------------------------- row movement


@jax.custom_vjp
def take_rows(x_ND: jax.Array, src_M: jax.Array, dst_N: jax.Array) -> jax.Array:
    """y[m] = x[src[m]] (src = N: a zero row). `dst` is the inverse map (M: not taken); each
    row of x is taken at most once, so the backward is the gather dx[n] = dy[dst[n]]."""
    return _gather_pad(x_ND, src_M)


def _gather_pad(x_ND, idx_M):
    padded = jnp.concatenate([x_ND, jnp.zeros((1,) + x_ND.shape[1:], x_ND.dtype)], axis=0)
    return jnp.take(padded, idx_M, axis=0, mode="clip")


def _take_rows_fwd(x_ND, src_M, dst_N):
    return _gather_pad(x_ND, src_M), (src_M, dst_N)


def _take_rows_bwd(res, dy_MD):
    src_M, dst_N = res
    zero = lambda i: jnp.zeros(i.shape, jax.dtypes.float0)  # noqa: E731 (integer inputs)
    return _gather_pad(dy_MD, dst_N), zero(src_M), zero(dst_N)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse_map(src_M: jax.Array, n: int) -> jax.Array:
    """dst[n] = the m with src[m] = n, or M if none (src entries >= n are padding)."""
    M = src_M.shape[0]
    return jnp.full((n + 1,), M, jnp.int32).at[src_M].set(jnp.arange(M, dtype=jnp.int32))[:n]


def sort_by_expert(expert_A: jax.Array, valid_A: jax.Array, num_experts: int):
    """(order_R, sizes_E): stable order of the assignments by expert, invalid ones last."""
    key_A = jnp.where(valid_A, expert_A, num_experts)
    order_R = jnp.argsort(key_A, stable=True).astype(jnp.int32)
    sizes_E = jnp.sum(key_A[:, None] == jnp.arange(num_experts)[None], axis=0, dtype=jnp.int32)
    return order_R, sizes_E


# --------------------------------------------------------------------------- grouped matmul


def grouped_matmul(x_RD, w_EDF, sizes_E, impl: str, block: int) -> jax.Array:
    """Rows of segment e (in expert order, sizes_E, rest zero) times w[e]."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_RD, w_EDF, sizes_E)
    return _blocked_matmul(x_RD, w_EDF, sizes_E, block)


def _blocked_matmul(x_RD, w_EDF, sizes_E, block):
    """Every expert segment padded to whole blocks of `block` rows; one batched matmul over
    the blocks with each block's expert kernel (static worst case: J = R/block + E blocks)."""
    R, E = x_RD.shape[0], w_EDF.shape[0]
    b = max(1, min(block, R))
    J = -(-R // b) + E
    M = J * b
    padded_E = -(-sizes_E // b) * b
    pad_end_E = jnp.cumsum(padded_E)
    pad_start_E = pad_end_E - padded_E
    start_E = jnp.cumsum(sizes_E) - sizes_E
    pos_M = jnp.arange(M, dtype=jnp.int32)
    expert_M = jnp.minimum(jnp.searchsorted(pad_end_E, pos_M, side="right"), E - 1)
    rank_M = pos_M - pad_start_E[expert_M]
    src_M = jnp.where(rank_M < sizes_E[expert_M], start_E[expert_M] + rank_M, R)
    rank_R = jnp.arange(R, dtype=jnp.int32) - start_E[_segment_of(sizes_E, R)]
    dst_R = pad_start_E[_segment_of(sizes_E, R)] + rank_R
    dst_R = jnp.where(jnp.arange(R) < jnp.sum(sizes_E), dst_R, M)
    x_JbD = take_rows(x_RD, src_M, dst_R).reshape(J, b, -1)
    # Each block's kernel by a one-hot matmul: its backward is a matmul too, where indexing
    # would transpose to a serial scatter-add of [blocks, D, F] on XLA:CPU.
    onehot_JE = jax.nn.one_hot(expert_M[::b], E, dtype=w_EDF.dtype)
    w_JDF = jnp.einsum("je,edf->jdf", onehot_JE, w_EDF)
    y_JbF = jnp.einsum("jbd,jdf->jbf", x_JbD, w_JDF)
    return take_rows(y_JbF.reshape(M, -1), dst_R, src_M)


def _segment_of(sizes_E, R):
    return jnp.minimum(
        jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(R), side="right"), sizes_E.shape[0] - 1
    )


# --------------------------------------------------------------------------- experts on rows


def _local_rows(x_ND, expert_NP, valid_NP, gate_NP, run, num_experts, keep_NPF=None):
    """One shard, all its experts local: sort, grouped FFN, unsort, gate-weighted combine.
    `run(rows, sizes, keep_rows)` gets each row's dropout mask from `keep_NPF` (or None)."""
    N, P = expert_NP.shape
    A = N * P
    order_R, sizes_E = sort_by_expert(expert_NP.reshape(A), valid_NP.reshape(A), num_experts)
    rows_valid = jnp.arange(A) < jnp.sum(sizes_E)
    src_R = jnp.where(rows_valid, order_R, A)  # assignment of each row (A: empty row)
    dst_A = inverse_map(src_R, A)
    x_AD = jnp.repeat(x_ND, P, axis=0) if P > 1 else x_ND
    keep_RF = None
    if keep_NPF is not None:  # a mask has no gradient: a plain gather (A: a dropped row)
        keep_RF = _gather_pad(keep_NPF.reshape(A, -1), src_R)
    y_RD = run(take_rows(x_AD, src_R, dst_A), sizes_E, keep_RF)
    y_AD = take_rows(y_RD, dst_A, src_R)
    y_NPD = y_AD.reshape(N, P, -1)
    return jnp.einsum("npd,np->nd", y_NPD, gate_NP.astype(y_NPD.dtype))


def _exchanged_rows(x_ND, expert_NP, valid_NP, gate_NP, run, num_experts, axis, X):
    """Expert parallel over mesh axis `axis` (size X): every shard sends each expert shard a
    fixed [A, D] buffer (room for all its assignments: no capacity, so no drop), all-to-all,
    grouped FFN on the E/X local experts, all-to-all back, combine."""
    N, P = expert_NP.shape
    A, E_l = N * P, num_experts // X
    expert_A, valid_A = expert_NP.reshape(A), valid_NP.reshape(A)
    order_R, sizes_E = sort_by_expert(expert_A, valid_A, num_experts)
    sent_X = jnp.sum(sizes_E.reshape(X, E_l), axis=1)
    start_X = jnp.cumsum(sent_X) - sent_X
    # Send buffer slot (j, i) holds sorted row start_j + i for i < sent_j.
    i_XA = jnp.arange(A, dtype=jnp.int32)[None, :]
    filled_XA = i_XA < sent_X[:, None]
    src_XA = jnp.where(filled_XA, order_R[jnp.minimum(start_X[:, None] + i_XA, A - 1)], A)
    dst_A = inverse_map(src_XA.reshape(X * A), A)
    x_AD = jnp.repeat(x_ND, P, axis=0) if P > 1 else x_ND
    send_XAD = take_rows(x_AD, src_XA.reshape(X * A), dst_A).reshape(X, A, -1)
    local_e = jnp.take(expert_A, jnp.minimum(src_XA, A - 1)) % E_l
    send_id_XA = jnp.where(filled_XA, local_e, E_l)
    recv_XAD = jax.lax.all_to_all(send_XAD, axis, 0, 0, tiled=True)
    recv_id_XA = jax.lax.all_to_all(send_id_XA, axis, 0, 0, tiled=True)
    y_XAD = _local_rows(
        recv_XAD.reshape(X * A, -1),
        recv_id_XA.reshape(X * A, 1),
        recv_id_XA.reshape(X * A, 1) < E_l,
        jnp.ones((X * A, 1), jnp.float32),
        lambda rows, sizes, _: run(rows, sizes),
        E_l,
    ).reshape(X, A, -1)
    back_XAD = jax.lax.all_to_all(y_XAD, axis, 0, 0, tiled=True)
    y_AD = take_rows(back_XAD.reshape(X * A, -1), dst_A, src_XA.reshape(X * A))
    y_NPD = y_AD.reshape(N, P, -1)
    return jnp.einsum("npd,np->nd", y_NPD, gate_NP.astype(y_NPD.dtype))


# --------------------------------------------------------------------------- capacity rows


def capacity_rows(x_GTD, expert_GTP, kept_GTP, gate_GTP, capacity: int, num_experts: int, ffn):
    """'sorted' where dense matmuls win (CPU, expert parallel): each group's kept rows, sorted
    by expert, fill the C slots of their expert ([G, E, C, D], the buffer `scatter` builds),
    `ffn` maps [G, E, C, D] -> [G, E, C, D]."""
    G, T, D = x_GTD.shape
    P, E, C = expert_GTP.shape[-1], num_experts, capacity
    A = T * P

    def slots(expert_A, kept_A):  # which assignment fills slot (e, c), A = none
        order_R, sizes_E = sort_by_expert(expert_A, kept_A, E)
        start_E = jnp.cumsum(sizes_E) - sizes_E
        c_C = jnp.arange(C, dtype=jnp.int32)
        pos_EC = jnp.minimum(start_E[:, None] + c_C[None], A - 1)
        return jnp.where(c_C[None] < sizes_E[:, None], order_R[pos_EC], A).reshape(E * C)

    src_GZ = jax.vmap(slots)(expert_GTP.reshape(G, A), kept_GTP.reshape(G, A))
    dst_GA = jax.vmap(inverse_map, (0, None))(src_GZ, A)
    x_GAD = jnp.repeat(x_GTD, P, axis=1) if P > 1 else x_GTD
    x_GZD = jax.vmap(take_rows)(x_GAD, src_GZ, dst_GA)
    y_GZD = ffn(x_GZD.reshape(G, E, C, D)).reshape(G, E * C, D)
    y_GTPD = jax.vmap(take_rows)(y_GZD, dst_GA, src_GZ).reshape(G, T, P, D)
    return jnp.einsum("gtpd,gtp->gtd", y_GTPD, gate_GTP.astype(y_GTPD.dtype))


# --------------------------------------------------------------------------- mesh wrapper


def expert_shards() -> int:
    """Size of the mesh axes the 'expert' logical axis maps to (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return 1
    return math.prod(mesh.shape[a] for a in _mesh_axes("expert", rules))


def _mesh_axes(name: str, rules) -> tuple[str, ...]:
    axes = core_spmd.from_sharding_rules((name,), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def slot_mask_rows(keep_EGCF, expert_GTP, slot_GTP) -> jax.Array:
    """keep_GTPF[g, t, p] = keep[expert, g, slot] of that assignment: the dropout mask the
    capacity dispatches draw over their [E, G, C, F] slots, read per assignment (not-kept
    assignments read some slot; their rows are not computed)."""
    C = keep_EGCF.shape[2]
    g_GTP = jnp.broadcast_to(jnp.arange(expert_GTP.shape[0])[:, None, None], expert_GTP.shape)
    return keep_EGCF[expert_GTP, g_GTP, jnp.clip(slot_GTP, 0, C - 1)]


def row_dispatch(
    x_GTD, expert_GTP, valid_GTP, gate_GTP, weights, noise, ffn: Callable, slot_GTP=None
):
    """y_GTD of the valid assignments through `ffn(rows_RD, sizes_E, weights, noise_rows)`
    (the experts as grouped matmuls), run per batch shard under a mesh.

    `weights` = (wi [E, D, F], wi_gate or None, wo [E, F, D]). `noise` is None, a dropout key
    (the rows draw their own mask: under a mesh the key is folded with the shard's position,
    so not the single-device draw, only its distribution) or, with `slot_GTP`, the capacity
    dispatches' slot mask keep_EGCF, which each row reads at its slot: then `ffn` gets the
    rows' [R, F] mask, the same draws on every mesh as scatter's.
    """
    G, T, D = x_GTD.shape
    P = expert_GTP.shape[-1]
    E = weights[0].shape[0]
    slot_mask = slot_GTP is not None and noise is not None
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        keep = slot_mask_rows(noise, expert_GTP, slot_GTP) if slot_mask else None
        flat = _local_rows(
            x_GTD.reshape(G * T, D),
            expert_GTP.reshape(G * T, P),
            valid_GTP.reshape(G * T, P),
            gate_GTP.reshape(G * T, P),
            lambda rows, sizes, keep_RF: ffn(rows, sizes, weights, _noise(noise, keep_RF)),
            E,
            None if keep is None else keep.reshape(G * T, P, -1),
        )
        return flat.reshape(G, T, D)
    batch, expert_axes, mlp = (_mesh_axes(n, rules) for n in ("batch", "expert", "mlp"))
    X = math.prod(mesh.shape[a] for a in expert_axes)
    if slot_mask and X > 1:
        raise ValueError("slot masks are for rows without expert parallelism (capacity_rows)")

    def shard(x, e, v, g, weights, noise, slot):
        if noise is not None and not slot_mask:
            # One mask per shard: with the replicated key every shard would draw the same mask.
            for a in batch + mlp:
                noise = jax.random.fold_in(noise, jax.lax.axis_index(a))

        def run(rows, sizes, keep_RF=None):
            y = ffn(rows, sizes, weights, _noise(noise, keep_RF))
            # d_ff is split over `mlp`: each shard's wo contraction is a partial sum.
            return jax.lax.psum(y, mlp) if mlp else y

        g_l, t = x.shape[:2]
        args = (x.reshape(g_l * t, D), e.reshape(g_l * t, P), v.reshape(g_l * t, P))
        args += (g.reshape(g_l * t, P), run)
        if X == 1:
            keep = slot_mask_rows(noise, e, slot).reshape(g_l * t, P, -1) if slot_mask else None
            y = _local_rows(*args, E, keep)
        else:
            y = _exchanged_rows(*args, E, expert_axes[0], X)
        return y.reshape(g_l, t, D)

    tok = jax.P(batch or None)
    w_in = jax.P(expert_axes or None, None, mlp or None)
    w_out = jax.P(expert_axes or None, mlp or None, None)
    w_specs = (w_in, None if weights[1] is None else w_in, w_out)
    if noise is None:
        noise_spec = None
    elif slot_mask:  # [E, G, C, F]: all experts (X = 1), this shard's groups and d_ff slice
        noise_spec = jax.P(None, batch or None, None, mlp or None)
    else:
        noise_spec = jax.P()
    slot_spec = tok if slot_mask else None
    specs = (tok, tok, tok, tok, w_specs, noise_spec, slot_spec)
    fn = jax.shard_map(shard, in_specs=specs, out_specs=tok)
    slot = slot_GTP if slot_mask else None
    return fn(x_GTD, expert_GTP, valid_GTP, gate_GTP, weights, noise, slot)


def _noise(noise, keep_RF):
    """What the rows' FFN gets: their slot mask when there is one, else the key (or None)."""
    return noise if keep_RF is None else keep_RF
