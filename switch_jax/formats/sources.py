"""Lazy, read-one-tensor-at-a-time views of checkpoint files: HF safetensors (sharded or not),
HF pytorch_model.bin (needs torch), T5X's legacy msgpack + tensorstore layout, Orbax PyTrees.

`source.read(name)` returns one float32-or-bfloat16 NumPy array; nothing else is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

from switch_jax.models.config import ConfigError


class Source(Protocol):
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...


def _missing(source: str, name: str) -> ConfigError:
    return ConfigError(f"{source} has no tensor {name!r} that the model config needs")


class Safetensors:
    """`model.safetensors`, or the shards listed in `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        files = _shards(index) if os.path.exists(index) else ["model.safetensors"]
        self.where = directory
        self._files = {}
        self._of: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConfigError(f"{index} lists {name}, which is missing; download it again")
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                why = " ".join(str(e).split())[:100] or type(e).__name__
                raise ConfigError(
                    f"{path} is not a readable safetensors file ({why}); download it again"
                ) from None
            self._files[name] = handle
            for key in handle.keys():
                self._of[key] = name

    def names(self) -> set[str]:
        return set(self._of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        if name not in self._of:
            raise _missing(self.where, name)
        return self._files[self._of[name]]


def _shards(index: str) -> list[str]:
    """The files a *.index.json maps tensors to; ConfigError naming the index if it is bad."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"{index} is not an index of shards (a JSON object with a 'weight_map'); "
            "download it again"
        ) from None


class TorchBin:
    """`pytorch_model.bin` (or its shards), memory-mapped by torch; only when torch is installed."""

    def __init__(self, directory: str):
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"{directory} holds pytorch_model.bin, which needs torch to read; install torch "
                f"or save the model as safetensors"
            ) from None
        index = os.path.join(directory, "pytorch_model.bin.index.json")
        files = _shards(index) if os.path.exists(index) else ["pytorch_model.bin"]
        self.where = directory
        self._tensors = {}
        for name in files:
            path = os.path.join(directory, name)
            self._tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise _missing(self.where, name)
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        import torch

        if name not in self._tensors:
            raise _missing(self.where, name)
        t = self._tensors[name]
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.float().numpy() if t.dtype == torch.float16 else t.numpy()


def open_hf(directory: str) -> Source:
    if os.path.exists(os.path.join(directory, "model.safetensors")) or os.path.exists(
        os.path.join(directory, "model.safetensors.index.json")
    ):
        return Safetensors(directory)
    if os.path.exists(os.path.join(directory, "pytorch_model.bin")) or os.path.exists(
        os.path.join(directory, "pytorch_model.bin.index.json")
    ):
        return TorchBin(directory)
    raise ConfigError(
        f"--source={directory} has no model.safetensors[.index.json] or pytorch_model.bin"
    )


class T5xLegacy:
    """T5X's own format (checkpoints.py VERSION 3): `checkpoint` is a flax msgpack of
    {'version', 'optimizer': {'target': params, 'state': ...}}; unpartitioned arrays sit inline,
    partitioned ones are TensorStore specs (zarr, path relative to the checkpoint directory)."""

    def __init__(self, directory: str):
        from flax import serialization

        with open(os.path.join(directory, "checkpoint"), "rb") as f:
            contents = serialization.msgpack_restore(f.read())
        if "optimizer" not in contents or "target" not in contents["optimizer"]:
            raise ConfigError(f"{directory}/checkpoint has no optimizer/target parameter tree")
        self.where = directory
        self.version = contents.get("version")
        self._leaves = dict(_flatten(contents["optimizer"]["target"], is_leaf=_is_ts_spec))
        self._open: dict = {}

    def names(self) -> set[str]:
        return set(self._leaves)

    def shape(self, name: str) -> tuple[int, ...]:
        leaf = self._leaf(name)
        if _is_ts_spec(leaf):
            return tuple(self._store(name).shape)
        return tuple(np.shape(leaf))

    def read(self, name: str) -> np.ndarray:
        leaf = self._leaf(name)
        if _is_ts_spec(leaf):
            return np.asarray(self._store(name).read().result())
        return np.asarray(leaf)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of axis 0 only (one expert's slice of an [E, ...] kernel)."""
        leaf = self._leaf(name)
        if _is_ts_spec(leaf):
            return np.asarray(self._store(name)[start:stop].read().result())
        return np.asarray(leaf)[start:stop]

    def _leaf(self, name: str):
        if name not in self._leaves:
            raise _missing(self.where, name)
        return self._leaves[name]

    def _store(self, name: str):
        import tensorstore as ts

        if name not in self._open:
            spec = json.loads(json.dumps(self._leaves[name], default=_json_default))
            kvstore = spec.get("kvstore", {})
            if kvstore.get("driver") not in ("file", "gfile"):
                raise ConfigError(
                    f"{self.where}: tensor {name} is stored with kvstore driver "
                    f"{kvstore.get('driver')!r}; copy the checkpoint to a local disk first"
                )
            kvstore["driver"] = "file"
            if "path" in kvstore:
                kvstore["path"] = os.path.join(self.where, kvstore["path"])
            else:  # tensorstore < 0.1.14 put the path at the top level
                spec["path"] = os.path.join(self.where, spec["path"])
            self._open[name] = ts.open(spec, open=True, read=True).result()
        return self._open[name]


class OrbaxTree:
    """An Orbax PyTree checkpoint (T5X's Orbax-era layout or ours); `root` picks the subtree
    ('target' for T5X, 'params' for switch_jax). Leaves are restored one at a time."""

    def __init__(self, directory: str, root: str):
        import orbax.checkpoint as ocp

        self.where, self.root = directory, root
        self._ckptr = ocp.PyTreeCheckpointer()
        tree = self._ckptr.metadata(directory).item_metadata.tree
        if root not in tree:
            raise ConfigError(f"{directory} has no {root!r} tree (found {sorted(tree)})")
        self._leaves = dict(_flatten(tree[root], is_leaf=lambda x: hasattr(x, "shape")))

    def names(self) -> set[str]:
        return set(self._leaves)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._leaves:
            raise _missing(self.where, name)
        return tuple(self._leaves[name].shape)

    def read(self, name: str) -> np.ndarray:
        import orbax.checkpoint as ocp

        if name not in self._leaves:
            raise _missing(self.where, name)
        target: dict = {}
        node = target.setdefault(self.root, {})
        keys = name.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        restored = self._ckptr.restore(
            self.where,
            args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True),
        )
        node = restored[self.root]
        for key in keys:
            node = node[key]
        return np.asarray(node)


def open_t5x(directory: str) -> Source:
    if os.path.exists(os.path.join(directory, "_METADATA")):
        return OrbaxTree(directory, "target")
    if os.path.exists(os.path.join(directory, "checkpoint")):
        return T5xLegacy(directory)
    raise ConfigError(
        f"--source={directory} is not a T5X checkpoint directory (no `checkpoint` msgpack file "
        f"and no Orbax _METADATA); pass the checkpoint_<step> directory itself"
    )


def _is_ts_spec(x) -> bool:
    return isinstance(x, dict) and "driver" in x and "kvstore" in x


def _flatten(tree, *, is_leaf, prefix: str = ""):
    if isinstance(tree, dict) and not is_leaf(tree):
        for key, child in tree.items():
            yield from _flatten(child, is_leaf=is_leaf, prefix=f"{prefix}{key}/")
    else:
        yield prefix[:-1], tree


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))
