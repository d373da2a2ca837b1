"""The layout of a MODEL_DIR: the one place that names its files and folders.

    MODEL_DIR/
      config.gin              operative gin config of the run (or of a conversion)
      model-info.txt          parameter counts and FLOPs, one `name: value` per line
      trainer.lease           the live trainer's lease (store/lease.py), with trainer.lease.lock
      checkpoints/<step>/     Orbax step directories: state/, meta/metadata, data/ (checkpoints.py)
      train/ eval/            metrics.jsonl and TensorBoard events (report/metrics.py)
      train/profile/          jax.profiler traces
      plots/                  PNGs of `switch-plot` (report/plots.py)
      experts/                step_<N>.json and PNGs of `switch-experts` (tools/expert_capture.py)

Paths are `epath.Path`s so that gs:// works wherever Orbax and TensorFlow's file system do.
Checkpoint paths are absolute (Orbax refuses relative ones); the others keep MODEL_DIR as given,
so that messages show the path the user typed.
"""

from __future__ import annotations

import os

from etils import epath

from switch_jax.models.config import ConfigError

CONFIG_GIN = "config.gin"
MODEL_INFO = "model-info.txt"
LEASE_FILE = "trainer.lease"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_DIR = "train"
EVAL_DIR = "eval"
PLOTS_DIR = "plots"
EXPERTS_DIR = "experts"  # switch-experts: step_N.json and its PNGs
PROFILE_DIR = "profile"  # inside train/
METRICS_FILE = "metrics.jsonl"  # inside train/ and eval/
WANDB_DIR = "wandb"  # Weights & Biases' local run files (report/wandb_log.py)
WANDB_ID_FILE = "run-id"  # inside wandb/: the W&B run that a resumed run continues

# The Orbax items of a step directory; they are also the keys of checkpoints.py's Composite.
STATE = "state"
META = "meta"
DATA = "data"
META_FILE = "metadata"  # inside meta/: the JSON of checkpoints.read_meta

_SUMMARY_DIRS = {"train": TRAIN_DIR, "eval": EVAL_DIR}


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute when local (a MODEL_DIR may be relative to the cwd); URLs as given."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def config_file(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/config.gin, the operative config that eval, infer and a resumed run read."""
    return epath.Path(model_dir) / CONFIG_GIN


def info_file(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/model-info.txt."""
    return epath.Path(model_dir) / MODEL_INFO


def lease_file(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/trainer.lease."""
    return epath.Path(model_dir) / LEASE_FILE


def checkpoints_dir(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/checkpoints (absolute), the root of Orbax's CheckpointManager."""
    return absolute(model_dir) / CHECKPOINTS_DIR


def step_dir(model_dir: str | os.PathLike, step: int) -> epath.Path:
    """MODEL_DIR/checkpoints/<step> (absolute)."""
    return checkpoints_dir(model_dir) / str(step)


def state_dir(step: epath.Path) -> epath.Path:
    """The parameters and optimizer state of a step directory."""
    return step / STATE


def meta_file(step: epath.Path) -> epath.Path:
    """The JSON metadata (step, settings, conversion source) of a step directory."""
    return step / META / META_FILE


def model_dir_of_step(step: epath.Path) -> epath.Path:
    """The MODEL_DIR that holds step directory `step`."""
    return step.parent.parent


def summary_dir(model_dir: str | os.PathLike, kind: str) -> epath.Path:
    """MODEL_DIR/train or MODEL_DIR/eval (`kind`: 'train' or 'eval'): metrics and events."""
    return epath.Path(model_dir) / _SUMMARY_DIRS[kind]


def metrics_file(model_dir: str | os.PathLike, kind: str) -> epath.Path:
    """MODEL_DIR/{train,eval}/metrics.jsonl, one JSON object per logged step."""
    return summary_dir(model_dir, kind) / METRICS_FILE


def profile_dir(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/train/profile, where jax.profiler writes its traces."""
    return summary_dir(model_dir, "train") / PROFILE_DIR


def wandb_id_file(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/wandb/run-id: the Weights & Biases run id, so that a resume continues it."""
    return epath.Path(model_dir) / WANDB_DIR / WANDB_ID_FILE


def plots_dir(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/plots."""
    return epath.Path(model_dir) / PLOTS_DIR


def experts_dir(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR/experts."""
    return epath.Path(model_dir) / EXPERTS_DIR


def resolve_step_dir(path: str | os.PathLike) -> epath.Path:
    """The step directory `path` names: a step directory itself, or the latest committed step of
    a MODEL_DIR or of its checkpoints/ folder (absolute).

    Raises:
      ConfigError: `path` holds no committed checkpoint.
    """
    path = absolute(path)
    if state_dir(path).exists():
        return path
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).exists() else path
    # Orbax commits by renaming a tmp folder to the bare step number: others are unfinished.
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    if not steps:
        raise ConfigError(f"init_checkpoint={path} holds no committed checkpoint")
    return root / str(steps[-1])


def committed_steps(model_dir: str | os.PathLike) -> list[int]:
    """Steps of MODEL_DIR/checkpoints that Orbax committed (renamed to the bare number)."""
    root = checkpoints_dir(model_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def require_run(model_dir: str, step: str | None = None, *, setting: str = "MODEL_DIR") -> None:
    """Refuse a MODEL_DIR that holds no checkpoint (or not checkpoint `step`) before anything is
    loaded or written: a read-only command must not turn a mistyped path into a directory.

    Args:
      model_dir: the MODEL_DIR as the user typed it.
      step: --step of eval / infer: 'latest', 'all', a step number or None (not checked).
      setting: how the user named the MODEL_DIR, for the message.

    Raises:
      ConfigError: one line naming the path, and a sibling with a close name that holds one.
    """
    if not model_dir:
        raise ConfigError(f"{setting} is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    path = epath.Path(model_dir)
    if not path.exists():
        raise ConfigError(f"{setting}={model_dir} does not exist{near_run(model_dir)}")
    if not path.is_dir():
        raise ConfigError(f"{setting}={model_dir} is a file, not a MODEL_DIR")
    steps = committed_steps(model_dir)
    if not steps:
        raise ConfigError(
            f"{setting}={model_dir} holds no checkpoint (no {CHECKPOINTS_DIR}/<step>)"
            + (near_run(model_dir) or "; train there first or pass the MODEL_DIR of a run")
        )
    if step is None or step in ("latest", "all"):
        return
    if not step.isdigit():
        raise ConfigError(f"--step={step} must be 'latest', 'all' or a step number")
    if int(step) not in steps:
        shown = ", ".join(map(str, steps[-8:]))
        raise ConfigError(f"--step={step}: {model_dir} has checkpoints of steps {shown}")


def remove_if_unused(model_dir: str) -> bool:
    """Delete a MODEL_DIR that holds no committed checkpoint (a local one that this process
    created for a start that then failed); True if removed."""
    import shutil

    if "://" in model_dir or committed_steps(model_dir) or not os.path.isdir(model_dir):
        return False
    shutil.rmtree(model_dir, ignore_errors=True)
    return not os.path.exists(model_dir)


def near_run(model_dir: str, holds=None) -> str:
    """'; did you mean SIBLING?' for a sibling folder with a close name that holds checkpoints
    (or, given `holds(path) -> bool`, what that accepts)."""
    import difflib

    if "://" in model_dir:  # listing a bucket to guess a name is slow and may be denied
        return ""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(model_dir)))
    try:
        siblings = [n for n in os.listdir(parent) if n != name]
    except OSError:
        return ""
    for near in difflib.get_close_matches(name, siblings, n=5, cutoff=0.6):
        if (holds or committed_steps)(os.path.join(parent, near)):
            shown = os.path.join(os.path.dirname(model_dir.rstrip("/")), near)
            return f"; did you mean {shown}?"
    return ""


def ensure_writable(model_dir: str) -> epath.Path:
    """Create MODEL_DIR (or check the existing one) and prove it writable, before any step.

    Raises:
      ConfigError: MODEL_DIR is unset, a file, or not writable.
    """
    if not model_dir:
        raise ConfigError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    path = epath.Path(model_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"MODEL_DIR={model_dir} is a file, not a directory; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"MODEL_DIR={model_dir} is not writable: {e.strerror or e}") from None
    return path


def write_atomic(path: epath.Path, text: str) -> None:
    """Write `text` to `path`: a kill mid-write leaves the old file, never a truncated one
    (the rename is atomic on local disks)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def write_run_files(
    model_dir: str | os.PathLike, operative_config: str, info, *, dispatch: str | None = None
) -> None:
    """Write config.gin (unless `operative_config` is empty) and model-info.txt.

    Args:
      model_dir: the MODEL_DIR, which exists.
      operative_config: gin text that rebuilds the run's configs; '' keeps config.gin as it is.
      info: models.size.ModelInfo of the model (its `as_dict()` items become the lines).
      dispatch: the MoE dispatch the run resolved (for 'auto'), added as `moe_dispatch: ...`.
    """
    if operative_config:
        write_atomic(config_file(model_dir), operative_config)
    lines = [
        f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v:.4g}" for k, v in info.as_dict().items()
    ]
    if dispatch is not None:
        lines.append(f"moe_dispatch: {dispatch}")
    write_atomic(info_file(model_dir), "\n".join(lines) + "\n")
