"""Weights & Biases beside TensorBoard: one W&B run per MODEL_DIR, continued when the run resumes.

    writer = wandb_log.start(configs.train, model_dir, settings=run.settings, is_chief=...)
    writer.log("train", step, scalars)   # the scalars TensorBoard gets, under train/ or eval/
    writer.finish()

Off unless WANDB_PROJECT is set; needs the `wandb` extra. WANDB_MODE=offline writes the run under
MODEL_DIR/wandb for a later `wandb sync`. The run id is kept in MODEL_DIR/wandb/run-id, so the
same command after a stop or preemption continues the same W&B run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

from switch_jax.models.config import ConfigError
from switch_jax.store import model_dir as model_dir_lib

INSTALL = "pip install 'switch_jax[wandb]'"


def _import_wandb(project: str):
    try:
        import wandb  # noqa: PLC0415 (an optional extra)
    except ImportError:
        raise ConfigError(
            f"WANDB_PROJECT={project!r} needs Weights & Biases: {INSTALL}, or unset WANDB_PROJECT"
        ) from None
    return wandb


def run_id(model_dir: str, new_id=lambda: secrets.token_hex(4)) -> str:
    """The W&B run id stored in MODEL_DIR (written with `new_id()` the first time)."""
    path = model_dir_lib.wandb_id_file(model_dir)
    if path.exists() and (stored := path.read_text().strip()):
        return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    made = new_id()
    model_dir_lib.write_atomic(path, made + "\n")
    return made


class WandbWriter:
    """Scalars of process 0 into one W&B run, at the trainer's own step numbers.

    The W&B run starts at the first scalar, so a start refused before the first step (a wrong
    INIT_CHECKPOINT, a mesh that does not fit) leaves no empty run behind.
    """

    def __init__(self, wandb, init_kwargs: dict, settings: Mapping[str, Any]):
        self._wandb, self._init_kwargs, self._settings = wandb, init_kwargs, dict(settings)
        self.run = None
        self.first_step = 0

    def _start(self) -> None:
        self.run = self._wandb.init(**self._init_kwargs)
        # After init, not through it: a resumed run may change the resumable settings.
        self.run.config.update(self._settings, allow_val_change=True)
        # A resumed W&B run refuses steps below the last one it holds: those are the steps the
        # stopped process logged after its last checkpoint, already in W&B with the same values
        # (training resumes exactly), so they are skipped here instead of warned about one by one.
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0)

    def log(self, kind: str, step: int, scalars: Mapping[str, float]) -> None:
        if self.run is None:
            self._start()
        if step >= self.first_step:
            self.run.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=int(step))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def start(
    train_cfg: Any, model_dir: str, *, settings: Mapping[str, Any], is_chief: bool
) -> WandbWriter | None:
    """A writer when WANDB_PROJECT is set (None elsewhere and on processes other than 0).

    Every process checks that wandb imports, so a multi-host run fails on all hosts at once.
    """
    project = train_cfg.wandb_project
    if not project:
        return None
    wandb = _import_wandb(project)
    if not is_chief:
        return None
    local = "://" not in os.fspath(model_dir)
    name = train_cfg.wandb_run_name or os.path.basename(os.path.normpath(os.fspath(model_dir)))
    init_kwargs = dict(
        project=project,
        entity=train_cfg.wandb_entity,
        name=name,
        id=run_id(model_dir),
        resume="allow",
        # WANDB_DIR, when set, wins; else the run's files sit in the MODEL_DIR they describe
        # (W&B needs a local folder: a gs:// MODEL_DIR leaves them in the working directory).
        dir=model_dir if local and "WANDB_DIR" not in os.environ else None,
    )
    return WandbWriter(wandb, init_kwargs, settings)
