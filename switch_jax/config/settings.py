"""Typed, frozen settings of a training run, one dataclass per concern; gin binds them.

`DataConfig` (what is read), `CheckpointConfig` (where the run lives), `OptimizerConfig`
(Adafactor and its schedule), `TrainConfig` (the loop, the mesh, seeds) and `DecodeConfig`
(how predictions are decoded). The loss
coefficients live with the model (`ModelConfig.z_loss`, `MoeConfig.aux_loss_coef`,
`MoeConfig.router_z_loss_coef`), each in one place.

A field built with `resumable(...)` may differ when a run resumes from its MODEL_DIR (where
things live, how often side work happens, the mesh); any other difference means the directory
holds another run, and the trainer refuses it (store/run_settings.check_same_run).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

from switch_jax.models.config import DISPATCHES, ConfigError, ModelConfig


def resumable(default: Any) -> Any:
    """A dataclass field whose value may change between a run and its resumption."""
    return dataclasses.field(default=default, metadata={"resumable": True})


def resumable_fields(cls: type) -> frozenset[str]:
    """'Class.field' names marked with `resumable` (the settings check skips them)."""
    return frozenset(
        f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if f.metadata.get("resumable")
    )


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
    # Gradient accumulation inside one step; the summed gradient is the same, so it may change.
    microbatches: int = resumable(1)

    def __post_init__(self):
        if self.schedule not in ("rsqrt", "constant"):
            raise ConfigError(f"OptimizerConfig.schedule={self.schedule!r} must be rsqrt|constant")
        if self.learning_rate <= 0:
            raise ConfigError(f"OptimizerConfig.learning_rate={self.learning_rate} must be > 0")
        if self.microbatches < 1:
            raise ConfigError("OptimizerConfig.microbatches must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the run reads; T5X macro names in comments."""

    mixture_or_task_name: str = "embedded_span_corruption"  # MIXTURE_OR_TASK_NAME
    # T5X's MIXTURE_OR_TASK_MODULE: imported before the task is looked up, so it can register it.
    mixture_or_task_module: str | None = resumable(None)
    task_feature_lengths: tuple[tuple[str, int], ...] = (("inputs", 512), ("targets", 114))
    batch_size: int = 32  # BATCH_SIZE (global, sequences)
    tfds_data_dir: str | None = resumable(None)  # TFDS_DATA_DIR
    # 'shard': each host reads its 1/N of the data (seqio ShardInfo, T5X's way). 'global': every
    # host builds the whole global batch and feeds its rows, so the batches (and losses) do not
    # depend on the number of processes, at N times the host input work.
    host_input: Literal["shard", "global"] = "shard"  # HOST_INPUT
    # SentencePiece model for the built-in C4 / mC4 tasks (None: the task's default, T5's on GCS);
    # a converted MODEL_DIR's config.gin points it at the spiece.model shipped with the weights.
    vocabulary: str | None = None  # VOCABULARY

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"DataConfig.batch_size={self.batch_size} must be >= 1")
        for name, length in self.task_feature_lengths:
            if length < 1:
                raise ConfigError(f"TASK_FEATURE_LENGTHS[{name!r}]={length} must be >= 1")
        if self.host_input not in ("shard", "global"):
            raise ConfigError(f"HOST_INPUT={self.host_input!r} must be 'shard' or 'global'")

    @property
    def feature_lengths(self) -> dict[str, int]:
        """{'inputs': 512, 'targets': 114}: stored as pairs so that the frozen config hashes."""
        return dict(self.task_feature_lengths)


UPCYCLE_GATES = ("keep", "compensate")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where the run lives and how its Orbax checkpoints are kept."""

    model_dir: str = resumable("")  # MODEL_DIR (local path or gs://)
    period: int = resumable(1000)  # CHECKPOINT_PERIOD
    keep: int = resumable(3)  # KEEP_CHECKPOINTS
    init_checkpoint: str | None = resumable(None)  # INIT_CHECKPOINT: start from this run
    # INIT_RESTORE: 'params' = its parameters, fresh optimizer, step 0; 'all' = parameters,
    # optimizer state and step continue (T5X's default; TRAIN_STEPS then counts from there).
    # 'upcycle' = a Switch model from a dense run: experts copy its FFNs (training/upcycle.py).
    init_restore: Literal["params", "all", "upcycle"] = resumable("params")
    # UPCYCLE_GATE (training/upcycle.py): 'keep' = the fresh router's gate multiplies each
    # copied FFN (~1/E of its output at first); 'compensate' = expert outputs scaled by E.
    upcycle_gate: Literal["keep", "compensate"] = resumable("keep")

    def __post_init__(self):
        for name in ("period", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CheckpointConfig.{name} must be >= 1")
        if self.init_restore not in ("params", "all", "upcycle"):
            raise ConfigError(
                f"INIT_RESTORE={self.init_restore!r} must be 'params', 'all' or 'upcycle'"
            )
        if self.upcycle_gate not in UPCYCLE_GATES:
            raise ConfigError(
                f"UPCYCLE_GATE={self.upcycle_gate!r} must be one of {', '.join(UPCYCLE_GATES)}"
            )
        if self.init_restore == "upcycle" and not self.init_checkpoint:
            raise ConfigError("INIT_RESTORE='upcycle' needs INIT_CHECKPOINT: the dense MODEL_DIR")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, mesh, seed, eval and logging cadence."""

    train_steps: int = resumable(1000)  # TRAIN_STEPS (total, not additional)
    mesh_shape: tuple[int, int, int] = resumable((-1, 1, 1))  # MESH_SHAPE (data, expert, model)
    dcn_mesh_shape: tuple[int, int, int] | None = resumable(None)  # multi-slice (across DCN)
    partition_rules: Literal["default", "fsdp"] = resumable("default")
    seed: int = 0
    eval_period: int = resumable(1000)
    eval_steps: int = resumable(20)
    log_period: int = resumable(10)
    # (first, last) step of a jax.profiler trace, written to MODEL_DIR/train/profile.
    profile_steps: tuple[int, int] | None = resumable(None)
    skip_nonfinite_updates: bool = resumable(False)
    # Weights & Biases beside TensorBoard (the `wandb` extra); None = off. Process 0 logs.
    wandb_project: str | None = resumable(None)  # WANDB_PROJECT
    wandb_entity: str | None = resumable(None)  # WANDB_ENTITY: None = the account's default
    wandb_run_name: str | None = resumable(None)  # WANDB_RUN_NAME: None = MODEL_DIR's basename
    # The progress line flags an expert whose share of tokens stays below this fraction of an
    # even share (1/E) for this many logged steps in a row; 0 turns the check off.
    dead_expert_threshold: float = resumable(0.1)  # DEAD_EXPERT_THRESHOLD
    dead_expert_logs: int = resumable(3)  # DEAD_EXPERT_LOGS

    def __post_init__(self):
        if self.train_steps < 0:
            raise ConfigError(f"TrainConfig.train_steps={self.train_steps} must be >= 0")
        if len(self.mesh_shape) != 3:
            raise ConfigError(
                f"MESH_SHAPE={self.mesh_shape} must have 3 entries (data, expert, model)"
            )
        for name in ("eval_period", "log_period"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1")
        if self.eval_steps < 0:
            raise ConfigError("TrainConfig.eval_steps must be >= 0")
        if not 0 <= self.dead_expert_threshold < 1:
            raise ConfigError(
                f"DEAD_EXPERT_THRESHOLD={self.dead_expert_threshold} must be in [0, 1) "
                "(a fraction of an even share of tokens; 0 = off)"
            )
        if self.dead_expert_logs < 1:
            raise ConfigError(f"DEAD_EXPERT_LOGS={self.dead_expert_logs} must be >= 1")
        if self.profile_steps is not None:
            first, last = self.profile_steps
            if not 1 <= first <= last:
                raise ConfigError(
                    f"TrainConfig.profile_steps={self.profile_steps} must be (first, last) "
                    "with 1 <= first <= last"
                )


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The `distill` objective (runs/distill.gin; paper §4.2, switch_jax.training.distill)."""

    enabled: bool = False  # runs/distill.gin turns it on
    teacher_model_dir: str = resumable("")  # TEACHER_MODEL_DIR: a MODEL_DIR, read-only
    soft_weight: float = 0.25  # DISTILL_SOFT_WEIGHT: loss share on the teacher's probabilities
    temperature: float = 1.0  # both distributions divided by it; the soft term scaled by T^2
    init_from_teacher: bool = True  # student starts from the teacher's non-expert weights
    # 'dense_twin': the model gin given with every Switch FFN made dense (the FLOP-matched
    # student); 'as_given': the model gin as is (then init_from_teacher needs the same shapes).
    student: Literal["dense_twin", "as_given"] = "dense_twin"

    def __post_init__(self):
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ConfigError(f"DISTILL_SOFT_WEIGHT={self.soft_weight} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"DistillConfig.temperature={self.temperature} must be > 0")
        if self.student not in ("dense_twin", "as_given"):
            raise ConfigError(f"DistillConfig.student={self.student!r} must be dense_twin|as_given")
        if self.enabled and not self.teacher_model_dir:
            raise ConfigError(
                "runs/distill.gin needs the teacher: pass --gin.TEACHER_MODEL_DIR=/path/to/run"
            )


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How predictions are decoded (metric evaluation, eval, infer); macros of runs/infer.gin.

    Changing any of it never changes what a run trains, so all of it may change on resume.
    """

    # Tokens per prediction, EOS included; None = the task's 'targets' feature length.
    max_decode_length: int | None = resumable(None)  # MAX_DECODE_LENGTH
    beam_size: int = resumable(1)  # BEAM_SIZE: 1 = greedy / sampling, > 1 = beam search
    temperature: float = resumable(0.0)  # TEMPERATURE: 0 = greedy (argmax)
    top_k: int = resumable(0)  # TOP_K: 0 = off
    top_p: float = resumable(1.0)  # TOP_P: 1 = off
    # NUM_RETURN_SEQUENCES: infer's n-best, the top beams (<= BEAM_SIZE) or that many samples.
    num_return_sequences: int = resumable(1)
    alpha: float = resumable(0.6)  # beam search brevity penalty ((5 + len) / 6) ** alpha (T5X)
    # MoE routing while decoding and scoring. 'dropless' (default): no capacity, so a row's
    # prediction and score never depend on the other rows or on padding. 'capacity': T5X's way,
    # each call's tokens routed over the batch with capacity (capacity_factor, dispatch below).
    routing: Literal["dropless", "capacity"] = resumable("dropless")
    capacity_factor: float | None = resumable(None)  # routing='capacity' only; None = eval's
    dispatch: str | None = resumable(None)  # routing='capacity' only; None = the model's
    # Validation examples per task that the metric evaluation decodes: None = all, 0 = none.
    eval_examples: int | None = resumable(None)  # EVAL_DECODE_EXAMPLES
    eos_id: int = resumable(1)
    seed: int = resumable(0)  # DECODE_SEED: the sampling key (TEMPERATURE > 0)

    def __post_init__(self):
        checks = (
            (self.max_decode_length is None or self.max_decode_length >= 1, "MAX_DECODE_LENGTH"),
            (self.beam_size >= 1, "BEAM_SIZE must be >= 1"),
            (self.temperature >= 0, "TEMPERATURE must be >= 0"),
            (self.top_k >= 0, "TOP_K must be >= 0"),
            (0 < self.top_p <= 1, "TOP_P must be in (0, 1]"),
            (self.alpha >= 0, "DecodeConfig.alpha must be >= 0"),
            (self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor > 0"),
            (self.dispatch is None or self.dispatch in DISPATCHES, f"dispatch in {DISPATCHES}"),
            (self.eval_examples is None or self.eval_examples >= 0, "EVAL_DECODE_EXAMPLES >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}, got {self}")
        if self.beam_size > 1 and self.temperature > 0:
            raise ConfigError("beam search is deterministic: set TEMPERATURE=0 with BEAM_SIZE > 1")
        self._check_num_return_sequences()
        if self.routing not in ("dropless", "capacity"):
            raise ConfigError(
                f"DecodeConfig.routing={self.routing!r} must be 'dropless' or 'capacity'"
            )
        if self.dispatch == "dropless":
            raise ConfigError(
                "DecodeConfig.dispatch='dropless' is DecodeConfig.routing='dropless' (the "
                "default): unset DecodeConfig.dispatch"
            )
        set_for_capacity = self.capacity_factor is not None or self.dispatch is not None
        if self.routing == "dropless" and set_for_capacity:
            raise ConfigError(
                "DecodeConfig.capacity_factor / DecodeConfig.dispatch apply only with "
                "DecodeConfig.routing='capacity' (dropless decoding has no capacity); "
                f"set routing='capacity' or unset them (got {self.capacity_factor}, "
                f"{self.dispatch!r})"
            )

    def _check_num_return_sequences(self) -> None:
        n = self.num_return_sequences
        if n < 1:
            raise ConfigError(f"NUM_RETURN_SEQUENCES={n} must be >= 1")
        if n > 1 and self.beam_size > 1 and n > self.beam_size:
            raise ConfigError(
                f"NUM_RETURN_SEQUENCES={n} > BEAM_SIZE={self.beam_size}: beam search returns at "
                f"most BEAM_SIZE sequences; set BEAM_SIZE >= {n} or NUM_RETURN_SEQUENCES <= "
                f"{self.beam_size}"
            )
        if n > 1 and self.beam_size == 1 and self.temperature == 0:
            raise ConfigError(
                f"NUM_RETURN_SEQUENCES={n} with greedy decoding: greedy has one answer; set "
                f"BEAM_SIZE >= {n} or TEMPERATURE > 0"
            )

    def for_length(self, targets_length: int) -> DecodeConfig:
        """With max_decode_length set (to `targets_length` when it was None)."""
        length = self.max_decode_length or targets_length
        return dataclasses.replace(self, max_decode_length=length)


class Configs(NamedTuple):
    """Everything one entry point reads from gin."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    optimizer: OptimizerConfig
    distill: DistillConfig | None = None  # set only when runs/distill.gin enables it
    decode: DecodeConfig = DecodeConfig()

    def replace(self, **changes) -> Configs:
        """A copy with some concerns swapped (same spelling as the frozen dataclasses')."""
        return self._replace(**changes)


RUN_CONFIG_CLASSES = (
    TrainConfig,
    DataConfig,
    CheckpointConfig,
    OptimizerConfig,
    DistillConfig,
    DecodeConfig,
)
