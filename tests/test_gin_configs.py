"""gin layer: every shipped config parses into the expected dataclasses; bad input fails."""

import glob
import os

import pytest

from switch_jax.config import gin_config
from switch_jax.config.settings import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig
from switch_jax.models.config import ConfigError, ModelConfig, MoeConfig

CONFIGS = gin_config.CONFIGS
MODELS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(str(CONFIGS / "models/*.gin")))
RUNS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(str(CONFIGS / "runs/*.gin")))


def load(files, bindings=()):
    gin_config.parse_gin(files, bindings)
    return gin_config.load_configs()


def test_catalogue_is_complete():
    names = {os.path.basename(p)[: -len(".gin")] for p in MODELS}
    expected = {"t5_base", "t5_large", "t5_xxl", "switch_base", "switch_large", "switch_xxl"}
    expected |= {"switch_c", "tiny", "tiny_lm"} | {f"switch_base_{e}" for e in (8, 16, 32, 64)}
    expected |= {"switch_base_128", "switch_base_256"}
    assert expected <= names
    assert {"runs/pretrain.gin", "runs/finetune.gin", "runs/eval.gin", "runs/demo.gin"} <= set(RUNS)


@pytest.mark.parametrize("path", MODELS + RUNS + ["defaults.gin"])
def test_every_file_starts_with_the_command_that_runs_it(path):
    head = (CONFIGS / path).read_text().splitlines()[:12]
    assert head[0].startswith("#")
    assert any("python -m switch_jax." in line for line in head), path


@pytest.mark.parametrize("model", MODELS)
def test_model_configs_parse(model):
    model_cfg, run, data, ckpt, opt, _, _ = load([model])
    assert type(model_cfg) is ModelConfig and type(run) is TrainConfig
    assert type(opt) is OptimizerConfig and type(data) is DataConfig
    assert type(ckpt) is CheckpointConfig
    if model_cfg.moe is not None:
        assert type(model_cfg.moe) is MoeConfig
    assert (model_cfg.moe is None) == os.path.basename(model).startswith("t5_")


@pytest.mark.parametrize("run_file", RUNS)
@pytest.mark.parametrize(
    "model", ["models/switch_base.gin", "models/t5_base.gin", "models/tiny.gin"]
)
def test_run_configs_parse_with_a_model(model, run_file):
    teacher = ["TEACHER_MODEL_DIR=/tmp/t"] if run_file == "runs/distill.gin" else []
    model_cfg, run, _, ckpt, opt, _, _ = load([model, run_file], ["MODEL_DIR=/tmp/x", *teacher])
    assert ckpt.model_dir == "/tmp/x"
    assert len(run.mesh_shape) == 3 and model_cfg.d_model > 0 and opt.learning_rate > 0


def test_released_shapes():
    base = load(["models/switch_base.gin"]).model
    assert (base.d_model, base.d_ff, base.activation, base.tied_logits) == (768, 3072, "relu", True)
    assert (base.moe.num_experts, base.moe.group_size, base.moe.min_capacity) == (128, 8192, 4)
    assert [i for i in range(12) if base.is_sparse(i)] == [1, 3, 5, 7, 9, 11]
    assert load(["models/switch_base_16.gin"]).model.moe.num_experts == 16
    xxl = load(["models/switch_xxl.gin"]).model
    assert (xxl.activation, xxl.d_ff, xxl.tied_logits, xxl.moe.num_experts) == (
        "geglu",
        10240,
        False,
        128,
    )
    assert (xxl.moe.capacity_factor_eval, xxl.moe.min_capacity, xxl.moe.group_size) == (
        4.0,
        2,
        4096,
    )
    c = load(["models/switch_c.gin"]).model
    assert (c.d_model, c.d_ff, c.num_heads, c.num_encoder_layers, c.tied_logits) == (
        2080,
        6144,
        30,
        15,
        False,
    )
    assert (c.moe.num_experts, c.moe.sparse_every, c.moe.capacity_factor_train) == (2048, 1, 1.0)
    assert load(["models/tiny_lm.gin"]).model.architecture == "decoder_only"


def test_run_settings():
    _, run, data, _, opt, _, _ = load(["models/switch_base.gin", "runs/pretrain.gin"])
    assert data.mixture_or_task_name == "c4_v301_span_corruption"
    assert data.feature_lengths == {"inputs": 512, "targets": 114}
    assert data.batch_size * 512 == 2**20 and run.train_steps == 550_000
    assert (opt.schedule, opt.learning_rate, opt.warmup_steps) == ("rsqrt", 1.0, 10_000)
    model_cfg, run, data, _, opt, _, _ = load(["models/switch_base.gin", "runs/finetune.gin"])
    assert (opt.schedule, opt.learning_rate) == ("constant", 1e-3)
    assert (model_cfg.dropout_rate, model_cfg.moe.expert_dropout_rate) == (0.1, 0.4)
    model_cfg, run, data, ckpt, _, _, _ = load(["runs/demo.gin"])
    assert model_cfg.d_model <= 256 and data.mixture_or_task_name == "embedded_span_corruption"
    assert ckpt.period <= 100 and run.train_steps <= 1000


def test_bindings_override_and_coerce():
    model_cfg, run, data, ckpt, opt, _, _ = load(
        ["models/tiny.gin"],
        [
            "MESH_SHAPE=(2, 4, 1)",
            "MODEL_DIR=gs://bucket/run",  # bare strings need no shell quoting
            "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            "LEARNING_RATE=1",  # int where a float is expected
            "NUM_EXPERTS=4",
            "ModelConfig.activation=geglu",
        ],
    )
    assert run.mesh_shape == (2, 4, 1) and ckpt.model_dir == "gs://bucket/run"
    assert data.task_feature_lengths == (("inputs", 64), ("targets", 16))
    assert opt.learning_rate == 1.0 and isinstance(opt.learning_rate, float)
    assert model_cfg.moe.num_experts == 4 and model_cfg.activation == "geglu"


def test_flag_rewriting():
    argv = ["prog", "--gin_file=a.gin", "--gin.MESH_SHAPE=(1, 2, 4)", "--gin.X.y='z'"]
    assert gin_config.rewrite_gin_args(argv) == [
        "prog",
        "--gin_file=a.gin",
        "--gin_bindings=MESH_SHAPE=(1, 2, 4)",
        "--gin_bindings=X.y='z'",
    ]


def test_operative_config_round_trip(tmp_path):
    first = load(["models/switch_xxl.gin", "runs/pretrain.gin"], ["MESH_SHAPE=(1, 2, 4)"])
    (tmp_path / "config.gin").write_text(gin_config.operative_config())
    assert load([str(tmp_path / "config.gin")]) == first


BAD = {
    "unknown macro": (["models/tiny.gin"], ["TRAIN_STEP=3"], "unknown gin macro 'TRAIN_STEP'"),
    "unknown parameter": (["models/tiny.gin"], ["ModelConfig.d_modl=3"], "d_modl"),
    "unknown configurable": (["models/tiny.gin"], ["Foo.x=3"], "Foo"),
    "unknown file": (["models/nope.gin"], [], "models/nope.gin' not found in the search paths"),
    "mesh of 2 entries": (["models/tiny.gin"], ["MESH_SHAPE=(2, 2)"], "MESH_SHAPE"),
    "wrong type": (["models/tiny.gin"], ["TRAIN_STEPS='many'"], "TRAIN_STEPS"),
    "invalid value": (["models/tiny.gin"], ["NUM_EXPERTS=0"], "num_experts"),
    "bad literal": (["models/tiny.gin"], ["ModelConfig.activation='swish'"], "activation"),
    "syntax": (["models/tiny.gin"], ["MESH_SHAPE=(2, 2"], "syntax error"),
    "no value": (["models/tiny.gin"], ["MESH_SHAPE"], "NAME=VALUE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case):
    files, bindings, needle = BAD[case]
    with pytest.raises(ConfigError) as e:
        load(files, bindings)
    message = str(e.value)
    assert "\n" not in message and needle in message, message


def test_bad_files(tmp_path):
    (tmp_path / "syntax.gin").write_text("ModelConfig.d_model = = 3\n")
    (tmp_path / "include.gin").write_text("include 'models/nothere.gin'\n")
    for name, needle in [("syntax.gin", "line 1"), ("include.gin", "models/nothere.gin")]:
        with pytest.raises(ConfigError) as e:
            gin_config.parse_gin([name], [], [str(tmp_path)])
        assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


# --- strictness: a misspelt name in a file fails in one line and suggests the closest ----------
STRICT_FILES = {
    # A new macro nobody reads: gin alone would train the default TRAIN_STEPS.
    "misspelt macro": (
        "include 'runs/demo.gin'\n\nTRAIN_STEP = 5\n",
        3,
        "TRAIN_STEP is set but nothing uses it; did you mean TRAIN_STEPS?",
    ),
    "undefined reference": (
        "TrainConfig.train_steps = %TRAIN_STEP\n",
        1,
        "%TRAIN_STEP is not defined anywhere; did you mean %TRAIN_STEPS?",
    ),
    "misspelt configurable": (
        "TrainConfg.model_dir = 'x'\n",
        1,
        "'TrainConfg'; did you mean TrainConfig?",
    ),
    "misspelt parameter": (
        "# comment\nTrainConfig.trian_steps = 3\n",
        2,
        "'trian_steps'; did you mean train_steps?",
    ),
}


@pytest.mark.parametrize("case", sorted(STRICT_FILES))
def test_misspelt_name_in_a_gin_file_names_file_line_and_suggestion(case, tmp_path):
    text, line, needle = STRICT_FILES[case]
    path = tmp_path / "user.gin"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load([str(path)])
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(f"gin file {path}, line {line}: "), message
    assert needle in message, message


def test_misspelt_macro_in_an_included_file_names_that_file(tmp_path):
    (tmp_path / "inner.gin").write_text("BATCH_SIZ = 4\n")
    (tmp_path / "outer.gin").write_text("include 'inner.gin'\n")
    with pytest.raises(ConfigError) as e:
        gin_config.parse_gin(["outer.gin"], [], [str(tmp_path)])
    assert str(e.value).startswith(f"gin file {tmp_path / 'inner.gin'}, line 1: macro BATCH_SIZ")
    assert "did you mean BATCH_SIZE?" in str(e.value)


def test_standard_and_file_local_macros_stay_accepted(tmp_path):
    # A standard macro the model does not read (dense model, expert dropout), and a macro a file
    # defines for its own bindings.
    path = tmp_path / "ok.gin"
    path.write_text(
        "include 'models/t5_base.gin'\nEXPERT_DROPOUT_RATE = 0.4\nMY_STEPS = 7\n"
        "TrainConfig.train_steps = %MY_STEPS\n"
    )
    run = load([str(path)]).train
    assert run.train_steps == 7


def test_command_line_typo_suggests_instead_of_listing():
    with pytest.raises(ConfigError) as e:
        load(["models/tiny.gin"], ["BATCH_SIZ=3"])
    message = str(e.value)
    assert (
        message
        == "unknown gin macro 'BATCH_SIZ' in --gin.BATCH_SIZ; did you mean --gin.BATCH_SIZE?"
    )
