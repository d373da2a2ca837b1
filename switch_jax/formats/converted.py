"""Write and read the MODEL_DIR of a converted model: Orbax params, config.gin, model-info.txt
(store/model_dir.py names the files).

The parameters go into MODEL_DIR/checkpoints/0/state as `{'params': {...: {'value': array}}}`,
the tree `checkpoints.restore_params` (INIT_CHECKPOINT) reads. They are written in partial
Orbax saves of at most `budget_bytes` each, so a converter holds one batch of tensors (and
never the whole model) in memory; a tensor larger than `disk_backed_bytes` is assembled in a
disk-backed memmap and written in chunks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.experimental import v1 as ocp_v1

from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig
from switch_jax.store import checkpoints
from switch_jax.store import model_dir as model_dir_lib

STEP = 0
_MACROS = {("ModelConfig", "dropout_rate"): "%DROPOUT_RATE"}
_MOE_MACROS = {("MoeConfig", "expert_dropout_rate"): "%EXPERT_DROPOUT_RATE"}

# A tensor to write: our path, its shape, and how to fill it (called with a writable array).
Fill = Callable[[np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    fill: Fill


def step_dir(model_dir: str) -> epath.Path:
    """The one step directory a conversion writes (absolute)."""
    return model_dir_lib.step_dir(model_dir, STEP)


def prepare(model_dir: str) -> None:
    """Refuse a MODEL_DIR that already holds checkpoints: conversion never overwrites one."""
    ckpts = model_dir_lib.checkpoints_dir(model_dir)
    if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
        raise ConfigError(
            f"--model_dir={model_dir} already holds checkpoints; choose a new or empty directory"
        )
    for leftover in ckpts.glob(f"{STEP}.partial_save*") if ckpts.exists() else []:
        shutil.rmtree(leftover)  # an interrupted earlier conversion: never committed
    ckpts.mkdir(parents=True, exist_ok=True)


def write_params(
    model_dir: str,
    tensors: Iterable[Tensor],
    *,
    dtype: str = "float32",
    budget_bytes: int = 1 << 30,
    disk_backed_bytes: int = 4 << 30,
) -> int:
    """Stream `tensors` into MODEL_DIR/checkpoints/0; returns the number of bytes written."""
    path = step_dir(model_dir)
    scratch = tempfile.mkdtemp(prefix=".convert-", dir=os.path.abspath(model_dir))
    batch: dict = {}
    batch_bytes = written = 0
    try:
        for t in tensors:
            nbytes = int(np.prod(t.shape)) * np.dtype(dtype).itemsize
            if nbytes > disk_backed_bytes:
                _save_large(path, t, dtype, scratch)
            else:
                value = np.empty(t.shape, dtype)
                t.fill(value)
                _insert(batch, t.path, value)
                batch_bytes += nbytes
            written += nbytes
            if batch_bytes >= budget_bytes:
                ocp_v1.partial.save(path, {"params": batch})
                batch, batch_bytes = {}, 0
                _release_memory()
        if batch:
            ocp_v1.partial.save(path, {"params": batch})
        ocp_v1.partial.finalize(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def _save_large(path: epath.Path, t: Tensor, dtype: str, scratch: str) -> None:
    # Filled piecewise by `t.fill` (per expert), paged to disk by the OS, written in 256 MiB chunks.
    value = np.lib.format.open_memmap(
        os.path.join(scratch, "tensor.npy"), mode="w+", dtype=dtype, shape=t.shape
    )
    t.fill(value)
    value.flush()
    context = ocp_v1.Context()
    context.array.saving.storage_options.chunk_byte_size = 256 << 20
    with context:
        ocp_v1.partial.save(path, {"params": _insert({}, t.path, value)})
    del value
    os.remove(os.path.join(scratch, "tensor.npy"))
    _release_memory()


def _release_memory() -> None:
    """Hand freed buffers back to the OS between saves: glibc keeps them otherwise, and host
    memory would grow with the model instead of staying at one batch (scripts/convert_memory.py)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _insert(tree: dict, path: tuple[str, ...], value) -> dict:
    node = tree
    for key in path:
        node = node.setdefault(key, {})
    node["value"] = value
    return tree


def write_meta(model_dir: str, meta: dict) -> None:
    """MODEL_DIR/checkpoints/0/meta/metadata, the JSON `checkpoints.read_meta` reads."""
    path = model_dir_lib.meta_file(step_dir(model_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": STEP, **meta}, sort_keys=True))


def read_params(model_dir: str, names: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    """The arrays at `names` of the latest checkpoint in MODEL_DIR (or a step directory)."""
    state = model_dir_lib.state_dir(model_dir_lib.resolve_step_dir(model_dir))
    target: dict = {}
    for name in names:
        _insert(target, ("params", *name), ocp.RestoreArgs(restore_type=np.ndarray))
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state,
            args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True),
        )
    except Exception as e:  # Orbax names missing keys in many exception types
        raise checkpoints.CheckpointError(f"cannot read parameters from {state}: {e}") from None
    out = {}
    for name in names:
        node = restored["params"]
        for key in name:
            node = node[key]
        out[name] = np.asarray(node["value"])
    return out


def saved_paths(model_dir: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{our path: shape} of every parameter stored in MODEL_DIR's latest checkpoint."""
    state = model_dir_lib.state_dir(model_dir_lib.resolve_step_dir(model_dir))
    tree = ocp.PyTreeCheckpointer().metadata(state).item_metadata.tree["params"]
    out = {}

    def walk(node, prefix):
        if "value" in node and not isinstance(node["value"], dict):
            out[prefix] = tuple(node["value"].shape)
            return
        for key, child in node.items():
            walk(child, prefix + (key,))

    walk(tree, ())
    return out


# --------------------------------------------------------------------------- config.gin
def config_gin(cfg: ModelConfig, *, header: list[str], vocabulary: str | None) -> str:
    """A model gin file (like configs/models/*.gin) with every ModelConfig / MoeConfig field;
    dropout stays on the DROPOUT_RATE / EXPERT_DROPOUT_RATE macros the run files set."""
    lines = [f"# {line}" if line else "#" for line in header]
    lines.append("")
    if vocabulary:
        lines += ["# The SentencePiece model found next to the weights (built-in C4 tasks use it)."]
        lines += [f"VOCABULARY = {vocabulary!r}", ""]
    for field in dataclasses.fields(ModelConfig):
        value = getattr(cfg, field.name)
        if field.name == "moe":
            text = "@MoeConfig()" if value is not None else "None"
        else:
            text = _MACROS.get(("ModelConfig", field.name), _gin_literal(value))
        lines.append(f"ModelConfig.{field.name} = {text}")
    if cfg.moe is not None:
        lines.append("")
        for field in dataclasses.fields(MoeConfig):
            value = getattr(cfg.moe, field.name)
            text = _MOE_MACROS.get(("MoeConfig", field.name), _gin_literal(value))
            lines.append(f"MoeConfig.{field.name} = {text}")
    return "\n".join(lines) + "\n"


def _gin_literal(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_run_files(model_dir: str, gin_text: str, cfg: ModelConfig) -> None:
    """config.gin (`gin_text`) and model-info.txt of the converted model `cfg`."""
    from switch_jax.models.size import model_info

    model_dir_lib.write_run_files(model_dir, gin_text, model_info(cfg))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def read_meta_vocabulary(model_dir: str) -> str | None:
    """The vocabulary path a conversion recorded in its checkpoint's meta (None otherwise)."""
    try:
        step = model_dir_lib.resolve_step_dir(model_dir)
        return checkpoints.read_meta(step).get("vocabulary")
    except (OSError, ValueError, ConfigError):
        return None
