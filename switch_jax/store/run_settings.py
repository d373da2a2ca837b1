"""The flat settings stored with every checkpoint, and the check that a resume trains that run.

Every checkpoint's metadata holds `run_settings(configs)`: {'ModelConfig.d_model': 128,
'MoeConfig.num_experts': 8, ...}. Resuming MODEL_DIR compares them with the new command's:
a field marked `resumable` (where things live, periods, eval, the mesh) may change; any other
difference is refused in one line. A setting that did not exist when the run was saved (this
package gained it since) is accepted at its default value, since the default is what the older
code did; set to anything else it is refused like any other change.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from switch_jax.config import settings
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig

_CLASSES = (ModelConfig, MoeConfig, *settings.RUN_CONFIG_CLASSES)


def resumable_settings() -> frozenset[str]:
    """'Class.field' settings a resumed run may change: the fields marked resumable (where
    things live, schedules of side work, the mesh: restore reshards)."""
    return frozenset().union(*(settings.resumable_fields(cls) for cls in _CLASSES))


def default_settings() -> dict[str, Any]:
    """{'Class.field': its default} for every field that has one, as JSON values."""
    defaults: dict[str, Any] = {}
    for cls in _CLASSES:
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                defaults[f"{cls.__name__}.{field.name}"] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                defaults[f"{cls.__name__}.{field.name}"] = field.default_factory()
    return json.loads(json.dumps(defaults, default=repr))


def run_settings(configs) -> dict[str, Any]:
    """Flat {'ModelConfig.d_model': 128, 'MoeConfig.num_experts': 8, ...}, JSON values."""
    flat: dict[str, Any] = {}
    for cfg in configs:
        if cfg is None:  # an optional part that is off (Configs.distill)
            continue
        for field in dataclasses.fields(cfg):
            value = getattr(cfg, field.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{type(value).__name__}.{sub.name}"] = getattr(value, sub.name)
            else:
                flat[f"{type(cfg).__name__}.{field.name}"] = value
    return json.loads(json.dumps(flat))  # tuples -> lists, as they come back from the meta


def check_same_run(saved: dict | None, current: dict, model_dir: str) -> None:
    """Refuse to resume MODEL_DIR with settings that would train something else."""
    if saved is None:
        return
    keys = sorted((set(saved) | set(current)) - resumable_settings())
    missing = object()
    defaults = default_settings()
    diffs = [
        f"{k}: {saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
        and not (k not in saved and k in defaults and current.get(k, missing) == defaults[k])
    ]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; … {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(
            f"MODEL_DIR={model_dir} holds a run with other settings ({shown}); restore them or "
            f"use a new MODEL_DIR (only steps, periods, eval, paths and the mesh may change)"
        )
