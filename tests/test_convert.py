"""Released-weight conversion: HF / T5X -> MODEL_DIR -> HF, with logit parity against HF.

The references are tests/fixtures/hf/*/reference.npz, written by scripts/make_hf_fixtures.py
with torch + transformers (not needed here): HF's own float32 logits, cross-entropy and router
losses on a right-padded batch. The HF-loads-our-export test runs only where transformers is.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from switch_jax.config import gin_config
from switch_jax.config.settings import DataConfig, OptimizerConfig
from switch_jax.formats import convert, converted, hf_config, layout, sources
from switch_jax.models.config import ConfigError, ModelConfig
from switch_jax.models.transformer import Transformer
from switch_jax.parallel import partitioning
from switch_jax.store import checkpoints
from switch_jax.training import steps
from tests.model_fixtures import tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def vocabulary_stand_ins():
    """A spiece.model next to each fixture's weights: the converter only points the vocabulary
    at it (never loads it), so a stand-in written here replaces a generated file in git."""
    for name in ("switch_tiny", "t5_tiny"):
        path = os.path.join(FIXTURES, name, "spiece.model")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(b"not a real sentencepiece model: fixture stand-in\n")


def reference(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as ref:
        return {k: ref[k] for k in ref.files}


def our_batch(ref: dict) -> dict:
    labels = ref["labels"]
    return {
        "encoder_input_tokens": ref["input_ids"].astype(np.int32),
        "decoder_input_tokens": ref["decoder_input_ids"].astype(np.int32),
        "decoder_target_tokens": np.where(labels < 0, 0, labels).astype(np.int32),
    }


def parity_config(cfg: ModelConfig, ref: dict, expert_capacity: int | None) -> ModelConfig:
    """float32 everywhere, no logits z-loss and HF's per-sequence capacity (docs/checkpoints.md)."""
    cfg = cfg.replace(dtype="float32", z_loss=0.0)
    length = ref["input_ids"].shape[1]
    return hf_config.hf_routing(cfg, length, expert_capacity) if cfg.moe else cfg


def restore(model_path: str, cfg: ModelConfig):
    """(graphdef, params) through checkpoints.restore_params, the INIT_CHECKPOINT path."""
    partitioner = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
    abstract = steps.abstract_train_state(cfg, OptimizerConfig(), partitioner)
    return abstract.graphdef, checkpoints.restore_params(model_path, abstract.state.params)


@functools.partial(jax.jit, static_argnames=("cfg", "graphdef"))
def _forward(cfg, graphdef, params, batch):
    logits, stats = nnx.merge(graphdef, params)(batch)
    _, metrics = steps.compute_loss(cfg, graphdef, params, batch, train=False)
    return logits, stats, metrics


def forward(cfg, graphdef, params, batch):
    return jax.device_get(_forward(cfg, graphdef, params, batch))


def flat_params(model_path: str, cfg: ModelConfig) -> dict:
    names = [e.path for e in layout.hf_entries(cfg, "switch" if cfg.moe else "t5")]
    return converted.read_params(model_path, names)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Both fixtures converted once: {name: (model_dir, written ModelConfig)}."""
    out = {}
    for name in ("switch_tiny", "t5_tiny"):
        path = str(tmp_path_factory.mktemp(name) / "model")
        out[name] = (path, convert.import_hf(os.path.join(FIXTURES, name), path))
    return out


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    "changes",
    [
        dict(activation="relu", tied_logits=True),
        dict(activation="geglu", tied_logits=False, moe=None),
        dict(activation="geglu", tied_logits=False),
        dict(activation="relu", tied_logits=True, scan_layers=True, num_encoder_layers=4),
        dict(activation="geglu", tied_logits=False, moe=None, scan_layers=True),
    ],
)
def test_layout_covers_the_model_tree_exactly(changes):
    cfg = tiny_config(**{"num_encoder_layers": 3, "num_decoder_layers": 2, **changes})
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    tree = {
        tuple(str(k) for k in p): tuple(v.shape)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    kinds = ["t5x"] + (
        ["switch" if cfg.moe else "t5"] if cfg.activation != "geglu" or not cfg.moe else []
    )
    for kind in kinds:
        entries = layout.t5x_entries(cfg) if kind == "t5x" else layout.hf_entries(cfg, kind)
        assert {s.path: s.shape for s in layout.stored(cfg, entries)} == tree, kind


# --------------------------------------------------------------------------- HF parity
def test_switch_matches_hf_logits_losses_and_routing(imported):
    path, cfg = imported["switch_tiny"]
    ref = reference("switch_tiny")
    cfg = parity_config(cfg, ref, expert_capacity=3)
    graphdef, params = restore(path, cfg)
    logits, stats, metrics = forward(cfg, graphdef, params, our_batch(ref))
    real = ref["labels"] >= 0
    assert np.abs(logits - ref["logits"])[real].max() <= LOGIT_TOL
    assert abs(metrics["cross_entropy"] - ref["cross_entropy"]) <= LOSS_TOL
    for stack in ("encoder", "decoder"):
        np.testing.assert_allclose(
            stats[stack].aux_loss, ref[f"{stack}_aux_loss"], rtol=0, atol=LOSS_TOL
        )
        np.testing.assert_allclose(
            stats[stack].router_z_loss, ref[f"{stack}_router_z_loss"], rtol=0, atol=LOSS_TOL
        )
        # Capacity 3 of 12 tokens per sequence: a quarter or more overflow, and still match.
        assert np.all(stats[stack].fraction_dropped > 0.2)


def test_scanned_import_matches_hf_and_exports_back_to_the_same_weights(imported, tmp_path):
    path = str(tmp_path / "scanned")
    cfg = convert.import_hf(os.path.join(FIXTURES, "switch_tiny"), path, scan_layers=True)
    assert cfg.scan_layers and cfg == imported["switch_tiny"][1].replace(scan_layers=True)
    ref = reference("switch_tiny")
    pcfg = parity_config(cfg, ref, expert_capacity=3)
    graphdef, params = restore(path, pcfg)
    logits, stats, _ = forward(pcfg, graphdef, params, our_batch(ref))
    assert np.abs(logits - ref["logits"])[ref["labels"] >= 0].max() <= LOGIT_TOL
    for stack in ("encoder", "decoder"):  # per-layer order survives the block stacking
        np.testing.assert_allclose(stats[stack].aux_loss, ref[f"{stack}_aux_loss"], atol=LOSS_TOL)
    out, again = str(tmp_path / "hf"), str(tmp_path / "again")
    convert.export_hf(path, out, cfg, expert_capacity=3)
    unscanned = convert.import_hf(out, again)
    first, second = (
        flat_params(imported["switch_tiny"][0], unscanned),
        flat_params(again, unscanned),
    )
    for key in first:
        assert np.array_equal(first[key], second[key]), key


def test_t5_1_1_matches_hf_logits_and_loss(imported):
    path, cfg = imported["t5_tiny"]
    assert (cfg.activation, cfg.tied_logits, cfg.moe) == ("geglu", False, None)
    ref = reference("t5_tiny")
    cfg = parity_config(cfg, ref, None)
    graphdef, params = restore(path, cfg)
    logits, _, metrics = forward(cfg, graphdef, params, our_batch(ref))
    real = ref["labels"] >= 0
    assert np.abs(logits - ref["logits"])[real].max() <= LOGIT_TOL
    assert abs(metrics["cross_entropy"] - ref["cross_entropy"]) <= LOSS_TOL


def test_model_dir_config_gin_rebuilds_the_config(imported):
    for name, (path, cfg) in imported.items():
        gin_config.parse_gin([os.path.join(path, "config.gin")])
        assert gin_config.configured(ModelConfig) == cfg
        vocab = gin_config.configured(DataConfig).vocabulary
        assert vocab == os.path.join(FIXTURES, name, "spiece.model")
        with open(os.path.join(path, "config.gin")) as f:
            text = f.read()
        assert "spiece.model" in text and "INIT_CHECKPOINT" in text
        assert "total_params" in open(os.path.join(path, "model-info.txt")).read()


# --------------------------------------------------------------------------- export
def test_export_round_trip_is_identical(imported, tmp_path):
    for name, (path, cfg) in imported.items():
        out = str(tmp_path / f"{name}_hf")
        # a small shard limit: the export is sharded and the re-import reads the index
        convert.export_hf(path, out, cfg, expert_capacity=3, max_shard_bytes=100_000)
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
        again = str(tmp_path / f"{name}_again")
        assert convert.import_hf(out, again) == cfg
        first, second = flat_params(path, cfg), flat_params(again, cfg)
        assert first.keys() == second.keys()
        for key in first:
            assert np.array_equal(first[key], second[key]), key


# torch is imported in a child process only: loaded after TensorFlow / JAX in one process (as a
# full pytest session does), its triton import can crash the interpreter.
HF_LOGITS = """
import sys, numpy as np, torch, transformers
out, cls, ref = sys.argv[1], getattr(transformers, sys.argv[2]), np.load(sys.argv[3])
model = cls.from_pretrained(out).eval()
names = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
with torch.no_grad():
    logits = model(**{k: torch.from_numpy(ref[k]) for k in names}).logits.numpy()
np.save(sys.argv[4], logits)
"""


def _in_child(script: str, *args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow  # imports torch (in a child process)
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch + transformers (pip install torch transformers) to load the export in HF",
)
def test_hf_loads_our_export_and_computes_our_logits(imported, tmp_path):
    for name, hf_class in (
        ("switch_tiny", "SwitchTransformersForConditionalGeneration"),
        ("t5_tiny", "T5ForConditionalGeneration"),
    ):
        path, cfg = imported[name]
        out = str(tmp_path / name)
        convert.export_hf(path, out, cfg, expert_capacity=3)
        logits_file = str(tmp_path / f"{name}_logits.npy")
        ref_file = os.path.join(FIXTURES, name, "reference.npz")
        _in_child(HF_LOGITS, out, hf_class, ref_file, logits_file)
        hf_logits = np.load(logits_file)
        ref = reference(name)
        pcfg = parity_config(cfg, ref, 3)
        graphdef, params = restore(path, pcfg)
        ours, _, _ = forward(pcfg, graphdef, params, our_batch(ref))
        real = ref["labels"] >= 0
        assert np.abs(hf_logits - ours)[real].max() <= LOGIT_TOL, name


# --------------------------------------------------------------------------- T5X
def t5x_names(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
    """Our path -> T5X name, written out from REFERENCE §2.7's table (independent of layout.py)."""
    names = {("token_embedder", "embedding"): "token_embedder/embedding"}
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        names[(stack, "relpos_bias", "rel_embedding")] = f"{stack}/relpos_bias/rel_embedding"
        names[(stack, "final_norm", "scale")] = f"{stack}/{stack}_norm/scale"
        for i in range(n):
            ours, t5x = (stack, "blocks", str(i), "layers", "0"), f"{stack}/layers_{i}"
            attn = {
                "encoder": [("self_attention", "attention")],
                "decoder": [
                    ("self_attention", "self_attention"),
                    ("cross_attention", "encoder_decoder_attention"),
                ],
            }[stack]
            for our_attn, t5x_attn in attn:
                for p in ("query", "key", "value", "out"):
                    names[ours + (our_attn, p)] = f"{t5x}/{t5x_attn}/{p}/kernel"
            norms = {
                "pre_self_attention_norm": "pre_attention_layer_norm"
                if stack == "encoder"
                else "pre_self_attention_layer_norm",
                "pre_mlp_norm": "pre_mlp_layer_norm",
            }
            if stack == "decoder":
                norms["pre_cross_attention_norm"] = "pre_cross_attention_layer_norm"
            for ours_norm, t5x_norm in norms.items():
                names[ours + (ours_norm, "scale")] = f"{t5x}/{t5x_norm}/scale"
            mlp = f"{t5x}/mlp/expert" if cfg.is_sparse(i) else f"{t5x}/mlp"
            names[ours + ("mlp", "wi")] = f"{mlp}/wi/kernel"
            names[ours + ("mlp", "wo")] = f"{mlp}/wo/kernel"
            if cfg.is_sparse(i):
                names[ours + ("mlp", "router")] = f"{t5x}/mlp/router/router_weights/w/kernel"
    return names


def t5x_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """flaxformer stores attention kernels flat: [D, H*K] in, [H*K, D] out."""
    if path[-1] in ("query", "key", "value"):
        return value.reshape(value.shape[0], -1)
    if path[-1] == "out":
        return value.reshape(-1, value.shape[-1])
    return value


def write_t5x_legacy(directory: str, target: dict, bf16: set[str]) -> None:
    """T5X checkpoints.py VERSION 3: msgpack with inline 1-D arrays and zarr TensorStores."""
    import ml_dtypes
    import tensorstore as ts
    from flax import serialization

    tree: dict = {}
    for name, value in target.items():
        if name in bf16:
            value = value.astype(ml_dtypes.bfloat16)
        leaf = value
        if value.ndim >= 2:
            rel = "target." + name.replace("/", ".")
            chunks = [max(1, value.shape[0] // 2), *value.shape[1:]]
            spec = {
                "driver": "zarr",
                "dtype": str(value.dtype),
                "kvstore": {"driver": "file", "path": rel},
                "metadata": {
                    "compressor": {"id": "gzip"},
                    "shape": list(value.shape),
                    "chunks": chunks,
                },
            }
            store = ts.open(
                {**spec, "kvstore": {"driver": "file", "path": os.path.join(directory, rel)}},
                create=True,
            ).result()
            store.write(value).result()
            leaf = spec
        node = tree
        *parents, last = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    contents = {
        "version": 3,
        "optimizer": {"target": tree, "state": {"step": np.int32(550000), "param_states": {}}},
    }
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(contents))


@pytest.mark.parametrize("kind", ["legacy", "orbax"])
def test_t5x_import_gives_the_hf_imported_model(imported, tmp_path, kind):
    path, cfg = imported["switch_tiny"]
    ours = flat_params(path, cfg)
    names = t5x_names(cfg)
    assert set(names) == set(ours)
    target = {names[p]: t5x_value(p, v) for p, v in ours.items()}
    src = tmp_path / "checkpoint_550000"
    src.mkdir()
    router = "encoder/layers_1/mlp/router/router_weights/w/kernel"
    if kind == "legacy":
        write_t5x_legacy(str(src), target, bf16={router})
    else:
        import orbax.checkpoint as ocp

        nested: dict = {}
        for name, value in target.items():
            node = nested
            *parents, last = name.split("/")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        shutil.rmtree(src)
        ocp.PyTreeCheckpointer().save(str(src), {"target": nested, "state": {"step": 0}})
    out = str(tmp_path / "model")
    convert.import_t5x(str(src), out, cfg)
    again = flat_params(out, cfg)
    for p, value in ours.items():
        if kind == "legacy" and names[p] == router:
            import ml_dtypes

            value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert np.array_equal(again[p], value), p


# --------------------------------------------------------------------------- streaming
def test_streamed_and_disk_backed_writes_are_identical(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        ("a", "small"): rng.standard_normal((4, 8)).astype(np.float32),
        ("a", "b", "medium"): rng.standard_normal((64, 64)).astype(np.float32),
        ("c", "experts"): rng.standard_normal((4, 32, 48)).astype(np.float32),  # 24 kB
        ("d",): rng.standard_normal((16,)).astype(np.float32),
    }
    filled = []

    def fill_from(path):
        def fill(out):
            filled.append(path)
            if out.ndim == 3:  # expert by expert, as the HF import fills a stack
                for j in range(out.shape[0]):
                    out[j] = arrays[path][j]
            else:
                out[...] = arrays[path]

        return fill

    tensors = [converted.Tensor(p, a.shape, fill_from(p)) for p, a in arrays.items()]
    out = str(tmp_path / "model")
    converted.prepare(out)
    # a 10 kB batch budget (3 partial saves) and the 24 kB stack assembled in a disk memmap
    converted.write_params(out, iter(tensors), budget_bytes=10_000, disk_backed_bytes=20_000)
    assert filled == list(arrays)  # one tensor at a time, in order
    back = converted.read_params(out, list(arrays))
    for path, value in arrays.items():
        assert np.array_equal(back[path], value), path
    assert converted.saved_paths(out) == {p: a.shape for p, a in arrays.items()}
    assert not [p for p in os.listdir(out) if p.startswith(".convert-")]


# --------------------------------------------------------------------------- refusals
def fixture_copy(tmp_path, edit=None, name="switch_tiny") -> str:
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(FIXTURES, name), src)
    if edit:
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        edit(config)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(config, f)
    return src


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(use_cache_v2=True), "field 'use_cache_v2'"),
        (lambda c: c.update(router_bias=True), "router_bias=True"),
        (lambda c: c.update(layer_norm_epsilon=1e-5), "layer_norm_epsilon"),
        (lambda c: c.update(dense_act_fn="gelu"), "dense_act_fn='gelu'"),
        (
            lambda c: c.update(num_sparse_decoder_layers=4),
            "num_sparse_encoder_layers / num_sparse_decoder_layers",
        ),
        (lambda c: c.update(num_sparse_encoder_layers=1), "num_sparse_encoder_layers"),
        (lambda c: c.update(d_ff=64), "shape"),
        (lambda c: c.update(num_experts=2), r"shape (4, 32), the config needs (2, 32)"),
        (
            lambda c: c.update(
                num_layers=3,
                num_decoder_layers=3,
                num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=1,
            ),
            "does not use",
        ),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(tmp_path, edit, message):
    src = fixture_copy(tmp_path, edit)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        convert.import_hf(src, str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "0")


def _moe(**changes):
    return lambda cfg: cfg.replace(moe=dataclasses.replace(cfg.moe, **changes))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: cfg.replace(architecture="decoder_only"), "decoder_only"),
        (lambda cfg: cfg.replace(activation="geglu"), "no gated MLP"),
        (_moe(top_k=2), "top-1 only"),
        (_moe(routing="expert_choice", decoder_routing="token_choice"), "routing='expert_choice'"),
        (_moe(routing="mesh_tf_top2", top_k=2), "top-1 only"),
        (_moe(load_balancing="loss_free"), "load_balancing='loss_free'"),
        (_moe(load_balancing="both"), "load_balancing='both'"),
        (
            lambda cfg: cfg.replace(
                num_encoder_layers=4, moe=dataclasses.replace(cfg.moe, sparse_every=3)
            ),
            "cannot express",  # layer 2 alone: HF puts one sparse layer at 1
        ),
    ],
)
def test_export_refuses_what_hf_would_compute_differently(change, message):
    """config.json is written only for a model HF runs as ours (before any weight is read)."""
    hf_config.to_hf(tiny_config())  # the base model exports
    with pytest.raises(ConfigError, match=message) as e:
        hf_config.to_hf(change(tiny_config()))
    assert "\n" not in str(e.value)


def test_a_model_dir_with_checkpoints_is_never_overwritten(imported, tmp_path):
    path, _ = imported["switch_tiny"]
    before = sorted(os.listdir(os.path.join(path, "checkpoints")))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        convert.import_hf(os.path.join(FIXTURES, "switch_tiny"), path)
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == before


def test_missing_weights_and_torch_files_are_named(tmp_path):
    src = fixture_copy(tmp_path)
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(ConfigError, match="no model.safetensors"):
        sources.open_hf(src)


# --------------------------------------------------------------------------- released configs
RELEASED = {
    "switch-base-32.json": "models/switch_base_32.gin",
    "switch-base-256.json": "models/switch_base_256.gin",
    "t5-v1_1-base.json": "models/t5_1_1_base.gin",
    "flan-t5-xxl.json": "models/t5_1_1_xxl.gin",
}
ARCHITECTURE = (
    "vocab_size d_model d_ff num_heads head_dim num_encoder_layers num_decoder_layers activation "
    "tied_logits relative_buckets relative_max_distance"
).split()


@pytest.mark.parametrize("config_file", sorted(RELEASED))
def test_released_configs_convert_to_our_gin_model_files(config_file):
    with open(os.path.join(FIXTURES, "released", config_file)) as f:
        config = json.load(f)
    tied = config.get("tie_word_embeddings", True)
    hf = hf_config.from_hf(config, lm_head_separate=not tied)
    gin_config.parse_gin([RELEASED[config_file]])
    ours = gin_config.configured(ModelConfig)
    for name in ARCHITECTURE:
        assert getattr(hf.model_cfg, name) == getattr(ours, name), name
    if ours.moe is None:
        assert hf.model_cfg.moe is None
        return
    for name in ("num_experts", "top_k", "sparse_every"):
        assert getattr(hf.model_cfg.moe, name) == getattr(ours.moe, name), name
    # Training settings differ on purpose: our gin files keep the T5X values the checkpoints
    # were trained with, config.json has HF's defaults (docs/checkpoints.md).
    assert (ours.moe.aux_loss_coef, ours.moe.router_z_loss_coef, ours.moe.jitter_eps) == (
        0.01,
        0,
        0,
    )
    assert (hf.model_cfg.moe.aux_loss_coef, hf.model_cfg.moe.router_z_loss_coef) == (1e-3, 1e-3)
    assert hf.expert_capacity == 64 and hf.model_cfg.moe.jitter_eps == 0.01


TORCH_SAVE_BF16 = """
import sys, torch
from safetensors.torch import load_file
tensors = load_file(sys.argv[1])
torch.save({k: v.to(torch.bfloat16) for k, v in tensors.items()}, sys.argv[2])
"""


@pytest.mark.slow  # imports torch (in child processes)
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="pytorch_model.bin needs torch"
)
def test_pytorch_model_bin_in_bfloat16_imports(imported, tmp_path):
    import ml_dtypes

    src = fixture_copy(tmp_path)
    weights = os.path.join(src, "model.safetensors")
    _in_child(TORCH_SAVE_BF16, weights, os.path.join(src, "pytorch_model.bin"))
    os.remove(weights)
    out = str(tmp_path / "model")
    # The public command, in its own process (it imports torch to read the .bin file).
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    done = subprocess.run(
        [sys.executable, "-m", "switch_jax.convert", "--from=hf", f"--source={src}",
         f"--model_dir={out}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = imported["switch_tiny"][1]
    path, _ = imported["switch_tiny"]
    first, second = flat_params(path, cfg), flat_params(out, cfg)
    for key in first:
        rounded = first[key].astype(ml_dtypes.bfloat16).astype(np.float32)
        assert np.array_equal(second[key], rounded), key


def test_no_run_resumes_in_a_converted_model_dir(imported):
    path, _ = imported["switch_tiny"]
    ckpts = checkpoints.Checkpoints(path, period=1, keep=1)
    try:
        assert ckpts.latest_step() == 0
        # saved_settings is what train() asks first, before it writes anything into MODEL_DIR
        with pytest.raises(checkpoints.CheckpointError, match=f"INIT_CHECKPOINT={path} and a new"):
            ckpts.saved_settings(0)
    finally:
        ckpts.close()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    cases = [
        (["--from=hf", "--to=hf", "--model_dir=x"], "exactly one of --from"),
        (["--from=hf", f"--source={tmp_path}", f"--model_dir={tmp_path}/m"], "has no config.json"),
    ]
    for args, message in cases:
        out = subprocess.run(
            [sys.executable, "-m", "switch_jax.convert", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("ConfigError")]
        assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
