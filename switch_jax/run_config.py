"""Typed, frozen settings of a training run (optimizer, mesh, data, checkpoints); gin binds them."""

from __future__ import annotations

import dataclasses
from typing import Literal

from switch_jax.models.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adafactor with the T5 settings (REFERENCE §3.1) and its learning-rate schedule."""

    schedule: Literal["rsqrt", "constant"] = "rsqrt"
    learning_rate: float = 1.0  # rsqrt: lr = learning_rate / sqrt(max(step, warmup_steps))
    warmup_steps: int = 10_000
    decay_rate: float = 0.8
    clipping_threshold: float = 1.0
    multiply_by_parameter_scale: bool = True
    factored: bool = True
    min_dim_size_to_factor: int = 128  # factor second moments only over dims at least this large
    microbatches: int = 1  # gradient accumulation steps inside one train step

    def __post_init__(self):
        if self.schedule not in ("rsqrt", "constant"):
            raise ConfigError(f"OptimizerConfig.schedule={self.schedule!r} must be rsqrt|constant")
        if self.learning_rate <= 0:
            raise ConfigError(f"OptimizerConfig.learning_rate={self.learning_rate} must be > 0")
        if self.microbatches < 1:
            raise ConfigError("OptimizerConfig.microbatches must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model; T5X macro names in comments."""

    model_dir: str = ""  # MODEL_DIR (local path or gs://)
    train_steps: int = 1000  # TRAIN_STEPS (total, not additional)
    batch_size: int = 32  # BATCH_SIZE (global, sequences)
    mixture_or_task_name: str = "embedded_span_corruption"  # MIXTURE_OR_TASK_NAME
    task_feature_lengths: tuple[tuple[str, int], ...] = (("inputs", 512), ("targets", 114))
    mesh_shape: tuple[int, int, int] = (-1, 1, 1)  # MESH_SHAPE (data, expert, model)
    dcn_mesh_shape: tuple[int, int, int] | None = None  # multi-slice (across DCN)
    partition_rules: Literal["default", "fsdp"] = "default"
    z_loss: float = 1e-4  # output-logits z-loss
    seed: int = 0
    tfds_data_dir: str | None = None
    checkpoint_period: int = 1000
    keep_checkpoints: int = 3
    eval_period: int = 1000
    eval_steps: int = 20
    log_period: int = 10
    init_checkpoint: str | None = None  # parameters only, for fine-tuning
    profile_steps: tuple[int, int] | None = None  # (first, last) step of a profiler trace
    skip_nonfinite_updates: bool = False

    def __post_init__(self):
        if self.train_steps < 0:
            raise ConfigError(f"TrainConfig.train_steps={self.train_steps} must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size={self.batch_size} must be >= 1")
        for name, length in self.task_feature_lengths:
            if length < 1:
                raise ConfigError(f"TASK_FEATURE_LENGTHS[{name!r}]={length} must be >= 1")
        if len(self.mesh_shape) != 3:
            raise ConfigError(
                f"MESH_SHAPE={self.mesh_shape} must have 3 entries (data, expert, model)"
            )
        for name in ("checkpoint_period", "eval_period", "log_period", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1")

    @property
    def feature_lengths(self) -> dict[str, int]:
        return dict(self.task_feature_lengths)
