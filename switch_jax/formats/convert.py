"""Import released weights into a switch_jax MODEL_DIR, and export one as an HF directory.

    import_hf(source_dir, model_dir)           # HF save_pretrained dir (Switch or T5 / T5.1.1)
    import_t5x(checkpoint_dir, model_dir, cfg) # T5X checkpoint_<step> dir; cfg from our gin file
    export_hf(model_dir, output_dir)           # save_pretrained-style dir transformers can load

Imports stream tensor by tensor (model_dir.write_params); every shape is checked against the
config before anything is written, and tensors the config does not use are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator

import numpy as np

from switch_jax.formats import converted as md
from switch_jax.formats import hf_config, layout, sources
from switch_jax.models.config import ConfigError, ModelConfig

VOCAB_NAMES = ("spiece.model", "sentencepiece.model")
# Copies (or aliases) of shared.weight, and a cross-attention bias table that old T5 files carry
# but no model reads (HF ignores it on load too): nothing of their own to convert.
_HF_ALIASES = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


def find_vocabulary(directory: str) -> str | None:
    for folder in (directory, os.path.dirname(os.path.abspath(directory))):
        for name in VOCAB_NAMES:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return os.path.abspath(path)
    return None


def _lm_head_separate(src: sources.Source) -> bool:
    names = src.names()
    if "lm_head.weight" not in names:
        return False
    return not np.array_equal(src.read("lm_head.weight"), src.read("shared.weight"))


def import_hf(
    source_dir: str, model_dir: str, *, scan_layers: bool = False, **write_options
) -> ModelConfig:
    """Convert an HF `save_pretrained` directory; returns the model config written.
    `scan_layers` writes the stacked tree of ModelConfig.scan_layers=True."""
    config = hf_config.read_config(source_dir)
    src = sources.open_hf(source_dir)
    hf = hf_config.from_hf(config, lm_head_separate=_lm_head_separate(src))
    cfg = hf.model_cfg.replace(scan_layers=scan_layers)
    entries = list(layout.hf_entries(cfg, hf.flavor))
    if not cfg.tied_logits and "lm_head.weight" not in src.names():
        # transformers-5 T5.1.1: the head is the embedding, without the d_model**-0.5 rescale.
        entries = [
            _retarget(e, "shared.weight") if e.path == ("logits_dense",) else e for e in entries
        ]
    unused = {n for n in _HF_ALIASES + ("lm_head.weight",) if n in src.names()}
    _check(entries, src, optional=unused)
    vocab = find_vocabulary(source_dir)
    header = [
        f"Converted by switch_jax.convert from the HF {hf.flavor} checkpoint",
        f"{os.path.abspath(source_dir)} ({md.now()}).",
        f"config.json dropout_rate={hf.dropout_rate} is the run files' DROPOUT_RATE; HF routes",
        f"with expert_capacity={hf.expert_capacity} per sequence (docs/checkpoints.md).",
    ]
    _write(
        model_dir,
        cfg,
        entries,
        src,
        header,
        vocab,
        {"converted_from": os.path.abspath(source_dir), "format": "hf"},
        **write_options,
    )
    return cfg


def import_t5x(source_dir: str, model_dir: str, cfg: ModelConfig, **write_options) -> ModelConfig:
    """Convert a T5X checkpoint (legacy msgpack + tensorstore, or Orbax) for the model `cfg`."""
    src = sources.open_t5x(source_dir)
    entries = list(layout.t5x_entries(cfg))
    _check(entries, src, optional=set())
    header = [
        f"Converted by switch_jax.convert from the T5X checkpoint {os.path.abspath(source_dir)}",
        f"({md.now()}, {type(src).__name__} layout).",
    ]
    vocab = find_vocabulary(source_dir)
    _write(
        model_dir,
        cfg,
        entries,
        src,
        header,
        vocab,
        {"converted_from": os.path.abspath(source_dir), "format": "t5x"},
        **write_options,
    )
    return cfg


def _retarget(entry: layout.Entry, source: str) -> layout.Entry:
    import dataclasses

    return dataclasses.replace(entry, sources=(source,))


def _expected_source_shape(entry: layout.Entry) -> tuple[int, ...]:
    ours = entry.shape[1:] if entry.stacked else entry.shape
    return tuple(entry.to_source(np.broadcast_to(np.zeros((), np.float32), ours)).shape)


def _check(entries: list[layout.Entry], src: sources.Source, *, optional: set[str]) -> None:
    """Every tensor the config needs exists with the right shape; no tensor is left over."""
    used = set()
    for e in entries:
        want = _expected_source_shape(e)
        for name in e.sources:
            if name not in src.names():
                where = getattr(src, "where", "the source")
                raise ConfigError(f"{where} has no tensor {name!r} (needed for {e.name})")
            have = src.shape(name)
            if have != want:
                raise ConfigError(
                    f"tensor {name} has shape {have}, the config needs {want} ({e.name})"
                )
            used.add(name)
    extra = sorted(src.names() - used - optional)
    if extra:
        shown = ", ".join(extra[:5]) + (f", … {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ConfigError(
            f"the weights hold tensors the config does not use ({shown}): wrong config?"
        )


def _tensors(cfg, entries: Iterable[layout.Entry], src: sources.Source) -> Iterator[md.Tensor]:
    rows = getattr(src, "read_rows", None)

    def fill_one(out, e):
        if e.stacked:
            for j, name in enumerate(e.sources):
                out[j] = e.to_ours(src.read(name))
        elif rows is not None and len(e.shape) == 3 and e.to_ours is layout._same:
            for start in range(0, e.shape[0], 8):  # 8 experts at a time (T5X [E, ...] kernels)
                stop = min(start + 8, e.shape[0])
                out[start:stop] = rows(e.sources[0], start, stop)
        else:
            out[...] = e.to_ours(src.read(e.sources[0]))

    for s in layout.stored(cfg, entries):

        def fill(out, s=s):
            if not s.scanned:
                return fill_one(out, s.parts[0])
            for block, e in enumerate(s.parts):
                fill_one(out[block], e)

        yield md.Tensor(s.path, s.shape, fill)


def _write(model_dir, cfg, entries, src, header, vocab, meta, **write_options) -> None:
    md.prepare(model_dir)
    md.write_params(model_dir, _tensors(cfg, entries, src), dtype=cfg.param_dtype, **write_options)
    md.write_meta(model_dir, {**meta, "vocabulary": vocab})
    fine_tune = [
        "",
        "Fine-tune (docs/checkpoints.md):",
        f"  python -m switch_jax.train --gin_file={os.path.abspath(model_dir)}/config.gin \\",
        f"    --gin_file=runs/finetune.gin --gin.INIT_CHECKPOINT={os.path.abspath(model_dir)} \\",
        "    --gin.MIXTURE_OR_TASK_NAME=... --gin.MODEL_DIR=/path/to/new/run",
    ]
    md.write_run_files(
        model_dir, md.config_gin(cfg, header=header + fine_tune, vocabulary=vocab), cfg
    )


# --------------------------------------------------------------------------- export
def export_hf(
    model_dir: str,
    output_dir: str,
    cfg: ModelConfig,
    *,
    expert_capacity: int = 64,
    max_shard_bytes: int = 5 << 30,
) -> dict:
    """Write `output_dir` (config.json + model*.safetensors) from MODEL_DIR's latest checkpoint
    of the model `cfg`; returns the config.json written."""
    from safetensors.numpy import save_file

    flavor = hf_config.T5 if cfg.moe is None else hf_config.SWITCH
    config = hf_config.to_hf(cfg, expert_capacity=expert_capacity)
    entries = list(layout.hf_entries(cfg, flavor))
    stored = layout.stored(cfg, entries)
    saved = md.saved_paths(model_dir)
    for s in stored:
        if saved.get(s.path) != s.shape:
            name = "/".join(s.path)
            raise ConfigError(
                f"{model_dir} has {name} of shape {saved.get(s.path)}, the config needs {s.shape}"
            )
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConfigError(f"--output={output_dir} exists and is not empty; choose a new directory")
    os.makedirs(output_dir, exist_ok=True)
    shards, shard, shard_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            path = os.path.join(output_dir, f".shard-{len(shards):05d}.safetensors")
            save_file(shard, path, metadata={"format": "pt"})
            shards.append((path, sorted(shard)))
            shard, shard_bytes = {}, 0

    for s in stored:
        value = md.read_params(model_dir, [s.path])[s.path]
        per_layer = [value[b] for b in range(len(s.parts))] if s.scanned else [value]
        for e, layer_value in zip(s.parts, per_layer, strict=True):
            parts = [layer_value[j] for j in range(e.shape[0])] if e.stacked else [layer_value]
            for name, part in zip(e.sources, parts, strict=True):
                tensor = np.ascontiguousarray(e.to_source(part))
                shard[name] = tensor
                shard_bytes += tensor.nbytes
                total += tensor.nbytes
        if shard_bytes >= max_shard_bytes:
            flush()
    flush()
    _name_shards(output_dir, shards, total)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    vocab = md.read_meta_vocabulary(model_dir)
    if vocab and os.path.exists(vocab):
        shutil.copy(vocab, os.path.join(output_dir, "spiece.model"))
    return config


def _name_shards(output_dir: str, shards: list, total: int) -> None:
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(output_dir, "model.safetensors"))
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, os.path.join(output_dir, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
