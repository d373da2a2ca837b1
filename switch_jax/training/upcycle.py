"""Sparse upcycling (Komatsuzaki et al. 2022): a Switch model's parameters from a dense checkpoint.

Every expert of a sparse layer starts as a copy of that layer's dense FFN, the router keeps its
fresh initialisation, and every other parameter (attention, norms, embeddings, the dense layers)
is copied unchanged. The optimizer starts fresh at step 0 (INIT_RESTORE='upcycle').

The gate still multiplies the copied expert. With gate='keep' (T5X's MoE upcycling, the paper's
setup: copies unchanged) a top-1 sparse layer's first output is p(token) * FFN(token), and a
fresh router's p is about 1/E, so the upcycled model starts well above the dense model's loss
(docs/benchmarks.md §2.2 measures the jump); with every expert chosen (top_k = num_experts,
nothing dropped) the gates sum to 1 and it computes exactly the dense model. gate='compensate'
scales each copy's output kernel by E, so that p * E * FFN(token) = FFN(token) exactly while the
router is uniform (and nearly so at its small init): the top-1 model starts at the dense one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from switch_jax.config.settings import UPCYCLE_GATES as GATES
from switch_jax.store import checkpoints
from switch_jax.store import model_dir as model_dir_lib
from switch_jax.store.checkpoints import CheckpointError

EXPERT_KERNELS = ("wi", "wi_gate", "wo")
FRESH = ("router",)  # parameters a dense model has no counterpart for


def plan(dense_shapes: dict, switch_leaves: dict) -> dict:
    """How each Switch parameter is made, as {name: ('copy' | 'fresh' | ('expand', axis))}.

    Args:
      dense_shapes: {name: shape} of the dense checkpoint's parameters.
      switch_leaves: {name: (shape, logical axes)} of the Switch model's parameters.
    Raises CheckpointError naming what does not correspond (e.g. another d_model, or a scanned
    layout on one side only).
    """
    how, problems, used = {}, [], set()
    for name, (shape, axes) in switch_leaves.items():
        leaf = name.split("/")[-1]
        shape = tuple(shape)
        if leaf in FRESH:
            how[name] = "fresh"
        elif name in dense_shapes and tuple(dense_shapes[name]) == shape:
            how[name], _ = "copy", used.add(name)
        elif leaf in EXPERT_KERNELS and "expert" in (axes or ()) and name in dense_shapes:
            axis = tuple(axes).index("expert")
            if tuple(dense_shapes[name]) == shape[:axis] + shape[axis + 1 :]:
                how[name], _ = ("expand", axis), used.add(name)
            else:
                problems.append(f"{name}: dense {tuple(dense_shapes[name])} vs switch {shape}")
        elif name in dense_shapes:
            problems.append(f"{name}: dense {tuple(dense_shapes[name])} vs switch {shape}")
        else:
            problems.append(f"missing {name}")
    problems += [f"unused {name}" for name in dense_shapes if name not in used]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" * (len(problems) > 6))
        raise CheckpointError(
            f"cannot upcycle from this checkpoint: {shown} (the dense run must have the same "
            f"shapes, layer counts and scan_layers as the Switch model, with ModelConfig.moe=None)"
        )
    return how


def upcycled_params(path: str, fresh_params, gate: str = "keep"):
    """The Switch parameters upcycled from the dense checkpoint at `path` (a MODEL_DIR or step
    dir), on the shardings of `fresh_params` (an nnx.State of the freshly initialised Switch
    parameters, whose routers are kept); `gate` as for `upcycle`."""
    step_dir = model_dir_lib.resolve_step_dir(path)
    state_dir = model_dir_lib.state_dir(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        saved = checkpointer.metadata(state_dir).item_metadata.tree.get("params")
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same one line
        raise CheckpointError(checkpoints.explain_restore_error(step_dir, e)) from None
    if saved is None:
        raise CheckpointError(f"{step_dir} has no parameters")
    switch = {_name(path): var for path, var in nnx.to_flat_state(fresh_params)}
    dense_shapes = {_key(n): tuple(leaf.shape) for n, leaf in checkpoints.flat_leaves(saved)}
    leaves = {n: (var.shape, var.get_metadata().get("out_sharding")) for n, var in switch.items()}
    how = plan(dense_shapes, leaves)
    mesh = next(iter(switch.values())).get_value().sharding.mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def target(name, leaf):
        fresh = switch[_key(name)].get_value() if how.get(_key(name)) == "copy" else None
        sharding = replicated if fresh is None else fresh.sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    saved_names = [n for n, _ in checkpoints.flat_leaves(saved)]
    targets = [target(n, x) for n, x in zip(saved_names, jax.tree.leaves(saved), strict=True)]
    item = {"params": jax.tree.unflatten(jax.tree.structure(saved), targets)}
    try:
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )["params"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(checkpoints.explain_restore_error(step_dir, e)) from None
    dense = {_key(n): x for n, x in checkpoints.flat_leaves(restored)}
    return upcycle(dense, fresh_params, gate)


def flat_values(params) -> dict:
    """{name: array} of an nnx.State of parameters (the names `plan` and `upcycle` use)."""
    return {_name(path): var.get_value() for path, var in nnx.to_flat_state(params)}


def upcycle(dense: dict, fresh_params, gate: str = "keep"):
    """The Switch parameters made from a dense model's `dense` = {name: array} (flat_values of
    its parameters, in memory or restored) on the shardings of `fresh_params`.

    gate: 'keep' copies every FFN unchanged; 'compensate' multiplies the copies' output kernel
    (wo) by the number of experts, undoing a uniform router's gate of 1/E (module docstring)."""
    if gate not in GATES:
        raise ValueError(f"upcycle gate {gate!r} must be one of {', '.join(GATES)}")
    fresh = nnx.to_flat_state(fresh_params)
    leaves = {
        _name(path): (var.shape, var.get_metadata().get("out_sharding")) for path, var in fresh
    }
    how = plan({n: tuple(x.shape) for n, x in dense.items()}, leaves)
    upcycled = []
    for path, var in fresh:
        name = _name(path)
        value = _make(how[name], dense.get(name), var.get_value())
        if gate == "compensate" and how[name] != "copy" and name.split("/")[-1] == "wo":
            value = value * jnp.asarray(value.shape[how[name][1]], value.dtype)  # x E
        upcycled.append((path, var.replace(value=value)))
    return nnx.from_flat_state(upcycled)


def _make(how, dense, fresh):
    if how == "fresh":
        return fresh
    if how == "copy":  # never the caller's buffer: a train step donates what it is given
        return jax.device_put(dense, fresh.sharding, may_alias=False)
    axis = how[1]
    expand = jax.jit(
        lambda w: jnp.broadcast_to(jnp.expand_dims(w, axis), fresh.shape).astype(fresh.dtype),
        out_shardings=fresh.sharding,
    )
    return expand(dense)


def _name(path: tuple) -> str:
    """A live parameter's name: its nnx path."""
    return "/".join(str(k) for k in path)


def _key(saved_name: str) -> str:
    """The live name of a saved leaf: Orbax saves each nnx Variable as {'value': array}."""
    return saved_name.removesuffix("/value")
