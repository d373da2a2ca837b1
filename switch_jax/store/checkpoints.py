"""Orbax checkpoints: train state + data-iterator position, atomic, async, restorable on any mesh.

A step directory (store/model_dir.py names it) holds `state` (sharded arrays), `data` (one
iterator checkpoint per process) and `meta` (JSON: step, batches consumed, model config). Orbax
writes into a temporary directory and renames it on commit, so a killed save never leaves a
readable half checkpoint.

Keep-K counts the regular checkpoints; one saved off the period on Ctrl-C or preemption is kept in
addition until a later regular one commits. An async save commits (renames its temporary
directory, then deletes the checkpoints keep-K drops) only if `commit_guard` passes at that
moment: the trainer's lease check, so a holder that stalled mid-save and lost MODEL_DIR to
another trainer commits nothing and deletes nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging as std_logging
import math
import os
import re
import shutil
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from switch_jax.models.config import ConfigError
from switch_jax.store import model_dir as model_dir_lib
from switch_jax.store.input_position import (
    DataIteratorRestore,
    DataIteratorSave,
    SavableIterator,
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which one and why."""


class CommitRefused(CheckpointError):
    """An async save was written but not committed: its commit guard failed (a lost lease)."""


class _HideRefusedCommits(std_logging.Filter):
    """Orbax logs a failed background commit with its traceback; a refused one is reported once,
    as one line, by whoever waits for the save."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, CommitRefused)


std_logging.getLogger("absl").addFilter(_HideRefusedCommits())


# Orbax re-raises TensorStore read failures of a truncated or garbled file as a bare Exception,
# so restore catches them all; the traceback stays available at --verbosity=1.
_READ_ERRORS = (Exception,)


@dataclasses.dataclass
class _KeepRegular:
    """Orbax preservation policy: the newest `keep` regular checkpoints, and the extra ones
    (saved off the period on Ctrl-C or preemption) newer than every regular one."""

    keep: int
    extras: set[int]

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        regular = sorted(c.step for c in checkpoints if c.step not in self.extras)
        kept, newest = set(regular[-self.keep :]), max(regular, default=-1)
        return [c.step in kept or (c.step in self.extras and c.step > newest) for c in checkpoints]


class Checkpoints:
    """Keep-K, every-N, async checkpoints of one run under MODEL_DIR/checkpoints."""

    def __init__(
        self,
        model_dir: str,
        *,
        period: int,
        keep: int,
        async_save: bool = True,
        cleanup_tmp: bool = True,
        commit_guard: Callable[[], None] | None = None,
    ):
        self.root = model_dir_lib.absolute(model_dir)
        self.directory = model_dir_lib.checkpoints_dir(model_dir)
        self._policy = _KeepRegular(keep, set())
        async_options = None
        if commit_guard is not None and async_save:
            # Orbax calls it in the commit thread of process 0, after every process wrote its
            # part and before the rename and keep-K deletions; raising skips both.
            async_options = ocp.AsyncOptions(post_finalization_callback=self._guard(commit_guard))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=period,
            preservation_policy=self._policy,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
            async_options=async_options,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._policy.extras.update(s for s in self.manager.all_steps() if _is_extra(self, s))
        self.attempted: list[int] = []  # steps passed to save(), committed or not

    def _guard(self, commit_guard: Callable[[], None]) -> Callable[[], None]:
        def commit() -> None:
            try:
                commit_guard()
            except Exception as e:  # noqa: BLE001 (whatever the guard says, nothing commits)
                step = self.attempted[-1] if self.attempted else "?"
                raise CommitRefused(f"checkpoint {step} not committed: {e}") from None

        return commit

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        """The directory of checkpoint `step` (committed or not)."""
        return model_dir_lib.step_dir(self.root, step)

    def save(
        self,
        step: int,
        state,
        *,
        iterator: SavableIterator | None = None,
        meta: dict | None = None,
        force: bool = False,
        extra: bool = False,
    ) -> bool:
        """Save `step` (async); `extra`: an off-period save (Ctrl-C, preemption) that keep-K
        keeps in addition to the regular ones until a later regular one commits."""
        meta = {"step": step, **(meta or {}), **({_EXTRA: True} if extra else {})}
        items = {
            model_dir_lib.STATE: ocp.args.StandardSave(state),
            model_dir_lib.META: ocp.args.JsonSave(meta),
        }
        if iterator is not None:
            items[model_dir_lib.DATA] = DataIteratorSave(iterator)
        self.attempted.append(step)
        if extra:
            self._policy.extras.add(step)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, *, iterator: SavableIterator | None = None):
        """Restore onto the shardings carried by `abstract_state` (any mesh).

        A checkpoint of another model is named with its differing parameters; an unreadable one
        raises CheckpointError naming the step directory, which is left untouched.
        """
        step_dir = self.step_dir(step)
        _refuse_converted(step_dir)
        items = {
            model_dir_lib.STATE: ocp.args.StandardRestore(abstract_state),
            model_dir_lib.META: ocp.args.JsonRestore(),
        }
        if iterator is not None:
            items[model_dir_lib.DATA] = DataIteratorRestore(iterator)
        try:
            if iterator is not None:
                _check_host_count(step_dir)
            state_dir = model_dir_lib.state_dir(step_dir)
            saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
            _check_param_shapes(saved.get("params"), abstract_state.params, step_dir)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            logging.debug("restore of %s failed", step_dir, exc_info=True)
            raise CheckpointError(
                f"{explain_restore_error(step_dir, e)} (left as is: move that step directory away "
                f"to resume from an earlier checkpoint)"
            ) from None
        return restored[model_dir_lib.STATE], restored[model_dir_lib.META]

    def saved_settings(self, step: int) -> dict | None:
        """The run settings stored with checkpoint `step` (None for checkpoints without them)."""
        step_dir = self.step_dir(step)
        _refuse_converted(step_dir)  # before a run writes anything into a converted MODEL_DIR
        try:
            return read_meta(os.fspath(step_dir)).get("settings")
        except _READ_ERRORS as e:
            raise CheckpointError(explain_restore_error(step_dir, e)) from None

    def check_free_space(self, abstract_state, keep: int) -> None:
        """Refuse to start when the disk cannot hold the checkpoints the run will keep.

        Needs one checkpoint in flight beside up to `keep` committed ones (the oldest is
        deleted only after the new one commits). Object stores (gs://) are not checked.
        """
        path = os.fspath(self.directory)
        if "://" in path:
            return
        size = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
        committed = len(self.manager.all_steps())
        # An extra (Ctrl-C) checkpoint stays beside the regular ones until the next one commits.
        needed = size * max(1, keep + 1 + len(self._policy.extras) - committed)
        free = shutil.disk_usage(path).free
        if free < needed:
            raise ConfigError(
                f"MODEL_DIR={os.fspath(self.root)} has {free / 2**20:,.0f} MiB free but "
                f"checkpoints need {needed / 2**20:,.0f} MiB ({size / 2**20:,.1f} MiB each, "
                f"KEEP_CHECKPOINTS={keep} + 1 in flight); free space, lower KEEP_CHECKPOINTS "
                f"or choose another MODEL_DIR"
            )

    def committed_steps(self) -> list[int]:
        """Steps committed on disk now (re-read: after a failed save the cached list is stale)."""
        try:
            self.manager.reload()
        except _READ_ERRORS:  # noqa: BLE001  (a full disk may fail the re-read too)
            logging.debug("reload of %s failed", self.directory, exc_info=True)
        return sorted(self.manager.all_steps())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_EXTRA = "kept_in_addition"


def _is_extra(ckpts: Checkpoints, step: int) -> bool:
    try:
        return bool(read_meta(os.fspath(ckpts.step_dir(step))).get(_EXTRA))
    except _READ_ERRORS:  # unreadable: counted as regular; a restore reports it
        return False


def is_out_of_space(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: OSError errno 28, or its text in TensorFlow's
    ResourceExhaustedError (iterator save) and TensorStore's errors (array writes)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)  # not every RESOURCE_EXHAUSTED: device out-of-memory is one too
        if "No space left on device" in text or "RESOURCE_EXHAUSTED: Error writing" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def select_steps(ckpts: Checkpoints, which: str | int = "latest") -> list[int]:
    """Committed steps of `ckpts` named by `which`: 'latest', 'all' or one step number."""
    steps = sorted(ckpts.manager.all_steps())
    where = os.fspath(ckpts.root)
    if not steps:
        raise CheckpointError(f"MODEL_DIR={where} has no checkpoint")
    if which == "all":
        return steps
    if which == "latest":
        return steps[-1:]
    try:
        step = int(which)
    except ValueError:
        raise ConfigError(f"checkpoint step {which!r} must be 'latest', 'all' or a step") from None
    if step not in steps:
        raise CheckpointError(f"MODEL_DIR={where} has no checkpoint {step}; it has {steps}")
    return [step]


def restore_params(path: str, abstract_params):
    """Parameters only (fine-tuning, distillation): `path` is a step dir or a MODEL_DIR.

    The optimizer state of the source run is ignored; the target shardings come from
    `abstract_params` (ShapeDtypeStructs with shardings), so any mesh works.
    """
    step_dir = model_dir_lib.resolve_step_dir(path)
    state_dir = model_dir_lib.state_dir(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        saved = checkpointer.metadata(state_dir).item_metadata.tree
        _check_param_shapes(saved.get("params"), abstract_params, step_dir)
        target = {"params": abstract_params}
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(explain_restore_error(step_dir, e)) from None
    return restored["params"]


def _check_host_count(step_dir: epath.Path) -> None:
    """Input positions of per-host shards fit only the number of processes that saved them."""
    saved = len(list((step_dir / model_dir_lib.DATA).glob("process_*")))
    settings = read_meta(os.fspath(step_dir)).get("settings") or {}
    if saved in (0, jax.process_count()) or settings.get("DataConfig.host_input") == "global":
        return
    raise CheckpointError(
        f"checkpoint {step_dir} was saved by {saved} processes, each reading its own shard of "
        f"the data (HOST_INPUT='shard'), and cannot resume on {jax.process_count()}: run "
        f"{saved} processes (a run started with HOST_INPUT='global' can change them)"
    )


def _refuse_converted(step_dir: epath.Path) -> None:
    """A converted MODEL_DIR (switch_jax.convert) holds parameters only: no run resumes in it."""
    try:
        source = read_meta(os.fspath(step_dir)).get("converted_from")
    except _READ_ERRORS:
        return  # unreadable meta is reported by the restore itself
    if source:
        model_dir = model_dir_lib.model_dir_of_step(step_dir)
        raise CheckpointError(
            f"{model_dir} holds weights converted from {source} (parameters only, no training "
            f"state): fine-tune from it with INIT_CHECKPOINT={model_dir} and a new MODEL_DIR"
        )


def restore_state(path: str, abstract_state):
    """The whole train state (parameters, optimizer state, step, noise key) of another run's
    checkpoint (`path`: a step dir or a MODEL_DIR), onto the shardings of `abstract_state`."""
    step_dir = model_dir_lib.resolve_step_dir(path)
    state_dir = model_dir_lib.state_dir(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        saved = checkpointer.metadata(state_dir).item_metadata.tree
        _check_param_shapes(saved.get("params"), abstract_state.params, step_dir)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        return checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
        )
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"{explain_restore_error(step_dir, e)} (INIT_RESTORE='all' needs the same optimizer "
            f"settings; INIT_RESTORE='params' restores the parameters only)"
        ) from None


def _check_param_shapes(saved, expected, step_dir) -> None:
    """Name every parameter that differs, so a wrong --init_checkpoint is obvious."""
    if saved is None:
        raise CheckpointError(f"{step_dir} has no parameters")
    saved_flat = dict(flat_leaves(saved))
    expected_flat = dict(flat_leaves(expected))
    problems = [f"missing {k}" for k in expected_flat if k not in saved_flat]
    problems += [f"unexpected {k}" for k in saved_flat if k not in expected_flat]
    problems += [
        f"{k}: checkpoint {tuple(saved_flat[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected_flat.items()
        if k in saved_flat and tuple(saved_flat[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; … {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"checkpoint {step_dir} does not match the model: {shown}")


def flat_leaves(tree):
    """(path, leaf) pairs with paths spelled the same for saved metadata and live trees."""

    def name(k) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(name(k) for k in path), leaf) for path, leaf in leaves]


def explain_restore_error(step_dir, error: Exception) -> str:
    """One line for a checkpoint that cannot be restored: the first line of the cause."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # TensorStore appends the repr of a bound method and its whole spec: noise, not a cause.
    first = re.split(r"\.? See full TensorStore details|<bound method", first)[0]
    if first.startswith("Encountered error while reading array"):
        first = "a saved array is unreadable (a truncated or corrupt file)"
    return f"cannot restore checkpoint {step_dir}: {first[:160]}"


def read_meta(step_dir: str | os.PathLike) -> dict:
    """The JSON metadata a step directory was saved with (step, settings, conversion source)."""
    return json.loads(model_dir_lib.meta_file(epath.Path(step_dir)).read_text())
