"""The input pipeline's position as an Orbax item: one directory per process in the step dir."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath


class SavableIterator(Protocol):
    def save(self, path: str) -> None: ...
    def restore(self, path: str) -> None: ...


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's input-pipeline position in the same atomic step directory."""

    def save(self, directory: epath.Path, args: DataIteratorSave):
        path = directory / f"process_{jax.process_index()}"
        path.mkdir(parents=True, exist_ok=True)
        args.iterator.save(os.fspath(path / "iterator"))

    def restore(self, directory: epath.Path, args: DataIteratorRestore):
        path = directory / f"process_{jax.process_index()}"
        if not path.exists():
            # Saved by fewer processes with HOST_INPUT='global' (Checkpoints.restore refuses
            # 'shard'): every process read the same stream, so process 0's position is ours.
            path = directory / "process_0"
        args.iterator.restore(os.fspath(path / "iterator"))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any
