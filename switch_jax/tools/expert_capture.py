"""Each token's routing in every MoE layer of a checkpoint, over batches of a task split, and
the experts report built from it (the library of switch-experts).

    report, files = report_experts(configs, step="latest", split="validation", max_batches=20)

or, to see the routing itself:

    run = build.build_run(configs)
    step, batches = capture_routing(run, step="latest", split="validation", max_batches=20)
    for layers in batches:          # one dict per batch: layer name -> LayerRouting (NumPy)
        ...

The model is the run's own, rebuilt with `MoeConfig.sow_routing` (models/moe.py): the same
parameters and outputs, plus each MoE layer's picks sown into nnx.Intermediate and read with
nnx.capture. The capacity is the eval one (`capacity_factor_eval`), as in switch-eval.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.moe import MoeLayer
from switch_jax.models.size import abstract_model
from switch_jax.report import expert_plots, expert_view
from switch_jax.store import checkpoints
from switch_jax.store import model_dir as model_dir_lib
from switch_jax.training import build, losses


class LayerRouting(NamedTuple):
    """One MoE layer's view of one batch (host arrays; P picks per token)."""

    expert_BLP: np.ndarray  # int32 expert of each pick
    kept_BLP: np.ndarray  # bool: processed (not dropped, not padding)
    gate_BLP: np.ndarray  # float32 combine weight, 0 where not kept
    tokens_BL: np.ndarray  # int32 token id the layer saw at each position
    real_BL: np.ndarray  # bool: not padding
    positions_BL: np.ndarray  # int32 position inside its packed segment


def report_experts(
    configs,
    *,
    step: str | int = "latest",
    split: str = "validation",
    max_batches: int = 20,
    dead_threshold: float = 0.1,
    min_count: int = 5,
    buckets: int = expert_view.DEFAULT_BUCKETS,
    output_dir: str | None = None,
) -> tuple[dict, list[str]]:
    """Route `max_batches` batches of `split` through checkpoint `step` of MODEL_DIR and write
    the report: (the report, [its JSON path, PNG paths...]) in `output_dir` (default
    MODEL_DIR/experts). Options as in report/expert_view.build_report."""
    check_reportable(configs.model)  # before anything is built: a dense run is refused at once
    run = build.build_run(configs, objective=losses.LABELS)
    chosen, batches = capture_routing(run, step=step, split=split, max_batches=max_batches)
    counts = new_counts(run.model_cfg, buckets)
    seen = 0
    for seen, layers in enumerate(batches, start=1):  # noqa: B007
        for name, routing in layers.items():
            counts[name].add(routing)
    sides = {name.split("/")[0] for name in counts}
    namers = {side: token_namer(configs, side) for side in sides}
    report = expert_view.build_report(
        counts,
        {name: namers[name.split("/")[0]] for name in counts},
        dead_threshold=dead_threshold,
        min_count=min_count,
    )
    model_dir = os.fspath(configs.checkpoint.model_dir)
    title = os.path.basename(os.path.normpath(model_dir))
    report = {"model_dir": model_dir, "step": chosen, "split": split, "batches": seen, **report}
    report["title"] = f"{title} step {chosen}"
    out = output_dir or os.fspath(model_dir_lib.experts_dir(model_dir))
    json_path = expert_view.write_json(report, os.path.join(out, f"step_{chosen}.json"))
    return report, [json_path, *expert_plots.plot_report(report, out, f"step_{chosen}")]


def new_counts(cfg: ModelConfig, buckets: int = expert_view.DEFAULT_BUCKETS) -> dict:
    """Empty LayerCounts for every MoE layer of `cfg`, in report order."""
    out = {}
    for name in layer_names(cfg):
        method = cfg.moe.stack_routing(causal=name.startswith("decoder"))
        out[name] = expert_view.LayerCounts(
            cfg.moe.num_experts,
            cfg.vocab_size,
            token_choice=method != "expert_choice",
            buckets=buckets,
        )
    return out


def token_namer(configs, side: str):
    """Token id -> its SentencePiece piece ('▁the', '<extra_id_0>'), in the vocabulary of the
    run's task feature that `side` ('encoder': inputs, 'decoder': targets) reads."""
    from switch_jax.data import tasks  # noqa: PLC0415
    from switch_jax.decode import evaluation  # noqa: PLC0415

    provider = tasks.get_provider(
        configs.data.mixture_or_task_name, **evaluation.data_options(configs.data)
    )
    features = provider.output_features
    vocab = features["inputs" if side == "encoder" and "inputs" in features else "targets"]
    vocab = vocab.vocabulary
    pieces = getattr(vocab, "tokenizer", None)
    size = pieces.get_piece_size() if pieces is not None else 0

    def name(t: int) -> str:
        if t == 0 and side == "decoder":  # a decoder input of 0 opens a target: it is BOS
            return "<bos>"
        if t < size:
            return pieces.id_to_piece(t)
        if t < vocab.vocab_size:  # seqio's sentinels sit above the file's pieces
            return f"<extra_id_{vocab.vocab_size - 1 - t}>"
        return f"<id {t}>"

    return name


def check_reportable(cfg: ModelConfig) -> None:
    """Refuse, in one line, a model whose routing cannot be read."""
    if cfg.moe is None or not any(cfg.is_sparse(i) for d in cfg.stack_depths() for i in range(d)):
        raise ConfigError("dense model: no experts to report (its config has no MoE layers)")
    if cfg.scan_layers:
        raise ConfigError(
            "switch-experts reads routing from unscanned layers, and this run's model has "
            "ModelConfig.scan_layers=True; report a run trained without scan_layers"
        )
    if jax.process_count() > 1:
        raise ConfigError("switch-experts runs in one process; start it without --process_count")


def layer_names(cfg: ModelConfig) -> list[str]:
    """'encoder/layer_1', ...: the MoE layers in the order of the report."""
    stacks = ("encoder", "decoder") if cfg.is_encoder_decoder else ("decoder",)
    return [
        f"{stack}/layer_{i}"
        for stack, depth in zip(stacks, cfg.stack_depths(), strict=True)
        for i in range(depth)
        if cfg.is_sparse(i)
    ]


def capture_routing(
    run: build.Run, *, step: str | int = "latest", split: str = "validation", max_batches: int = 20
) -> tuple[int, Iterator[dict[str, LayerRouting]]]:
    """(the checkpoint's step, an iterator over at most `max_batches` batches of `split`).

    The split is read once, unshuffled for any split but 'train' (as switch-eval reads it), and
    never repeated, so a token is counted at most once.
    """
    check_reportable(run.model_cfg)
    ckpts = run.checkpoints()
    try:
        (chosen,) = checkpoints.select_steps(ckpts, step if step == "latest" else int(step))
        step_dir = os.fspath(ckpts.step_dir(chosen))
    finally:
        ckpts.close()
    with run.partitioner.activate():
        params = checkpoints.restore_params(step_dir, run.abstract_params)
    return chosen, _batches(run, params, split, max_batches)


def _batches(run: build.Run, params, split: str, max_batches: int):
    from switch_jax.data import DataError, pipeline  # noqa: PLC0415 (TensorFlow, only now)

    forward = _sowing_forward(run)
    dataset = pipeline.make_dataset(**{**run.pipeline_args(split), "repeat": False})
    seen = 0
    for seen, batch in enumerate(dataset.take(max_batches), start=1):  # noqa: B007
        host = {k: v.numpy() for k, v in batch.items()}
        with run.partitioner.activate():
            sown = jax.device_get(forward(params, run.device_batch(host)))
        # jit returns the dict with sorted keys: put the layers back in model order.
        yield {name: _with_inputs(sown[name], host, name) for name in layer_names(run.model_cfg)}
    if seen == 0:
        data = run.configs.data
        raise DataError(
            f"{data.mixture_or_task_name} split {split!r} holds fewer than BATCH_SIZE="
            f"{data.batch_size} examples: lower --gin.BATCH_SIZE or pick another --split"
        )


def _sowing_forward(run: build.Run):
    """jit(params, batch) -> {layer name: TokenRouting}, eval mode, on the run's mesh."""
    cfg = run.model_cfg
    sowing = cfg.replace(moe=dataclasses.replace(cfg.moe, sow_routing=True))
    graphdef, _ = nnx.split(abstract_model(sowing), nnx.Param)
    names = layer_names(cfg)

    def forward(params, batch):
        model = nnx.merge(graphdef, params)
        _, sown = nnx.capture(model, nnx.Intermediate)(batch, train=False)
        return dict(zip(names, _sown(model, sown), strict=True))

    return jax.jit(
        forward,
        in_shardings=(run.setup.model.shardings, run.partitioner.batch_sharding),
        out_shardings=run.partitioner.replicated,
    )


def _sown(model, sown) -> list:
    """Each MoE layer's TokenRouting from the captured State `sown`, in `layer_names` order
    (one call per layer here)."""
    out = []
    for name in ("encoder", "decoder"):
        stack = getattr(model, name)
        for b, block in enumerate(stack.blocks if stack is not None else ()):
            for i, layer in enumerate(block.layers):
                if isinstance(layer.mlp, MoeLayer):
                    routing = sown[name]["blocks"][b]["layers"][i]["mlp"]["routing"]
                    (route,) = routing.get_value()
                    out.append(route)
    return out


def _with_inputs(route, host: dict, name: str) -> LayerRouting:
    """The sown picks with the tokens, padding and positions of the stack they came from."""
    side = name.split("/", 1)[0]
    tokens = host["encoder_input_tokens" if side == "encoder" else "decoder_input_tokens"]
    segments = host.get(f"{side}_segment_ids")
    if segments is None:  # the model's own rule for an unpacked batch (models/transformer.py)
        segments = host["encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"]
    positions = host.get(f"{side}_positions")
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return LayerRouting(
        np.asarray(route.expert_BLP),
        np.asarray(route.kept_BLP),
        np.asarray(route.gate_BLP),
        np.asarray(tokens),
        np.asarray(segments) > 0,
        np.asarray(positions),
    )
