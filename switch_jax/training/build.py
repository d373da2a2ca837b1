"""One way to build a run from its configs, once; train, eval, infer, bench, info and compile
all take the Run it returns instead of rebuilding parts of it.

    run = build_run(configs)                 # configs: config.settings.Configs (from gin)
    run.partitioner, run.model_cfg           # the mesh; the model config adapted to it
    run.abstract_params                      # parameter shapes + shardings (restoring params)
    run.setup.abstract_state                 # shapes + shardings of the whole train state
    run.setup.init_state(), run.setup.train_step, run.setup.eval_step
    run.checkpoints()                        # Orbax checkpoints of MODEL_DIR
    run.pipeline_args("train")               # this host's switch_jax.data.pipeline arguments
    run.device_batch(host_batch)             # this host's numpy batch -> global jax.Arrays

The model graph, abstract state, optimizer and steps are built once (steps.setup_training),
for the objective the configs name: the label cross-entropy, or with `configs.distill` the
distillation objective and its teacher (distill.objective_from_configs).
`build_run(configs, partitioner=...)` takes a partitioner built on other devices (e.g. the
compile-only devices of a TPU topology); nothing here touches data or checkpoints until asked
(a distillation teacher's config.gin is read at build time, its params at the first step).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from switch_jax.config.settings import Configs
from switch_jax.models.config import ModelConfig
from switch_jax.models.size import ModelInfo, model_info
from switch_jax.parallel import partitioning
from switch_jax.store import checkpoints, run_settings
from switch_jax.training import losses, steps


@dataclasses.dataclass
class Run:
    configs: Configs
    partitioner: partitioning.Partitioner
    model_cfg: ModelConfig  # adapted to the mesh (MoE group partitions)
    info: ModelInfo
    setup: steps.TrainingSetup  # model graph, abstract state, init, train/eval steps

    @property
    def abstract_params(self):
        """nnx.State of the parameters' ShapeDtypeStructs, carrying their target shardings."""
        return self.setup.model.params

    @property
    def lengths(self) -> tuple[int, int]:
        return feature_lengths(self.model_cfg, self.configs.data.feature_lengths)

    @property
    def tokens_per_step(self) -> int:
        return self.configs.data.batch_size * sum(self.lengths)

    @property
    def settings(self) -> dict:
        """The flat settings stored with every checkpoint (a resume must match them)."""
        return run_settings.run_settings(self.configs)

    def checkpoints(
        self, *, async_save: bool = True, cleanup_tmp: bool = True, commit_guard=None
    ) -> checkpoints.Checkpoints:
        ckpt = self.configs.checkpoint
        return checkpoints.Checkpoints(
            os.fspath(ckpt.model_dir),
            period=ckpt.period,
            keep=ckpt.keep,
            async_save=async_save,
            cleanup_tmp=cleanup_tmp,
            commit_guard=commit_guard,
        )

    def pipeline_args(self, split: str) -> dict:
        """Arguments of data.pipeline.make_batches / make_dataset for this host."""
        data, train = self.configs.data, self.configs.train
        hosts = 1 if data.host_input == "global" else jax.process_count()
        options = {"tfds_data_dir": data.tfds_data_dir} if data.tfds_data_dir else {}
        if data.vocabulary:
            options["vocabulary"] = data.vocabulary
        if data.mixture_or_task_module:
            options["module"] = data.mixture_or_task_module
        return dict(
            task_or_mixture=data.mixture_or_task_name,
            split=split,
            feature_lengths=data.feature_lengths,
            batch_size=data.batch_size // hosts,
            architecture=self.model_cfg.architecture,
            seed=train.seed,
            shard_index=0 if hosts == 1 else jax.process_index(),
            num_shards=hosts,
            shuffle=split == "train",
            repeat=True,
            **options,
        )

    def device_batch(self, host_batch: dict) -> dict:
        """This host's batch (numpy) as global arrays; with host_input='global' the host holds
        the whole batch and feeds only its rows."""
        if self.configs.data.host_input == "global" and jax.process_count() > 1:
            rows = self.partitioner.host_batch_slice(self.configs.data.batch_size)
            host_batch = {k: v[rows] for k, v in host_batch.items()}
        return self.partitioner.shard_batch(host_batch)


def feature_lengths(model_cfg: ModelConfig, lengths: dict[str, int]) -> tuple[int, int]:
    """(input, target) lengths; input 0 for a decoder-only model."""
    if model_cfg.is_encoder_decoder:
        return lengths.get("inputs", 0), lengths["targets"]
    return 0, lengths["targets"]


def make_partitioner(configs: Configs, devices=None) -> partitioning.Partitioner:
    train = configs.train
    return partitioning.Partitioner(
        train.mesh_shape, train.dcn_mesh_shape, train.partition_rules, devices=devices
    )


def build_run(
    configs: Configs,
    *,
    partitioner: partitioning.Partitioner | None = None,
    objective: losses.Objective | None = None,
) -> Run:
    """Partitioner, adapted model config, model info and steps of `configs` (no state yet).

    Args:
      configs: the run's configs.
      partitioner: default: the mesh of configs.train on this process's devices.
      objective: what the train step minimises; default: the one `configs` names (the
        distillation objective when configs.distill is set, else the label cross-entropy).

    Raises ConfigError (one line) when the model or the batch does not split over the mesh, or a
    distillation teacher does not fit the student.
    """
    partitioner = partitioner or make_partitioner(configs)
    model_cfg = partitioner.adapt_model_config(configs.model, configs.data.batch_size)
    if objective is None and configs.distill is not None:
        from switch_jax.training import distill  # noqa: PLC0415 (reads the teacher's config)

        objective = distill.objective_from_configs(configs, model_cfg, partitioner)
    objective = objective or losses.LABELS
    with partitioner.activate():
        setup = steps.setup_training(
            model_cfg,
            configs.optimizer,
            partitioner,
            seed=configs.train.seed,
            skip_nonfinite=configs.train.skip_nonfinite_updates,
            objective=objective,
        )
    lengths = feature_lengths(model_cfg, configs.data.feature_lengths)
    info = model_info(model_cfg, *lengths, params=setup.model.params)
    return Run(configs, partitioner, model_cfg, info, setup)
