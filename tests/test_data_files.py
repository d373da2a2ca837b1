"""Tasks named by their files (MIXTURE_OR_TASK_NAME='jsonl:...'), MIXTURE_OR_TASK_MODULE, and the
one-line errors for bad files."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

seqio = pytest.importorskip("seqio")

from switch_jax.config import gin_config  # noqa: E402
from switch_jax.data import DataError, files, pipeline, tasks  # noqa: E402
from switch_jax.decode import evaluation  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
VOCAB = 130  # what SentencePiece can make of these words, sentinels included
VAL_RECORDS = 20
# A 2-expert Switch model small enough to compile in seconds; VOCAB_SIZE matches vocab_size=.
MODEL = f"""
VOCAB_SIZE = {VOCAB}
NUM_EXPERTS = 2
MoeConfig.group_size = 64
ModelConfig.d_model = 32
ModelConfig.d_ff = 64
ModelConfig.num_heads = 2
ModelConfig.head_dim = 16
"""
RUN = [
    "TRAIN_STEPS = 5",
    "BATCH_SIZE = 8",
    "CHECKPOINT_PERIOD = 5",
    "EVAL_PERIOD = 5",
    "EVAL_STEPS = 1",
    "LOG_PERIOD = 1",
    "LR_SCHEDULE = 'constant'",
    "LEARNING_RATE = 0.01",
]


def _first_word_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append({"question": "first word of: " + " ".join(words), "answer": words[0]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with JSONL inputs/targets (train, validation) and a text file; its own cache."""
    root = tmp_path_factory.mktemp("files")
    rng = random.Random(0)
    for name, n in (("train", 300), ("validation", VAL_RECORDS)):
        with open(root / f"{name}.jsonl", "w") as f:
            for row in _first_word_rows(rng, n):
                f.write(json.dumps({"inputs": row["question"], "targets": row["answer"]}) + "\n")
    with open(root / "renamed.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _first_word_rows(rng, 50))
    with open(root / "docs.txt", "w") as f:
        f.writelines(" ".join(rng.choices(WORDS, k=12)) + "\n\n" for _ in range(400))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWITCH_JAX_CACHE", str(root / "cache"))
        yield root


def _spec(data, fmt: str, train: str, *options: str) -> str:
    return ",".join([f"{fmt}:{data / train}", f"vocab=trained,vocab_size={VOCAB}", *options])


def test_spec_parses_bare_glob_keys_and_field_names():
    spec = files.parse("jsonl:d/train-*.jsonl,validation=d/v.jsonl,inputs=q,vocab=t5")
    assert (spec.format, spec.train, spec.validation, spec.vocab) == (
        "jsonl",
        "d/train-*.jsonl",
        "d/v.jsonl",
        "t5",
    )
    assert spec.field("inputs") == "q" and spec.field("targets") == "targets"
    assert spec.task_name == "jsonl_d_train"
    assert files.parse("text:train=a.txt,objective=lm,name=mine").task_name == "mine"
    assert files.is_spec("tsv:x.tsv") and not files.is_spec("glue_cola_v002")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("csv:a.csv", "format 'csv'"),
        ("jsonl:a.jsonl,vocab_sise=8", "option 'vocab_sise' is unknown"),
        ("tsv:a.tsv,inputs=q", "renames a JSONL field"),
        ("text:a.txt,objective=supervised", "use jsonl or tsv"),
        ("jsonl:a.jsonl,vocab_size=50", "no room beside 100 sentinels"),
    ],
)
def test_bad_specs_are_one_line(spec, words):
    with pytest.raises(DataError) as e:
        files.parse(spec)
    assert words in str(e.value) and "\n" not in str(e.value) and repr(spec) in str(e.value)


def test_jsonl_rows_reach_the_batches_token_for_token(data):
    spec = _spec(data, "jsonl", "train.jsonl", f"validation={data / 'validation.jsonl'}")
    provider = tasks.get_provider(spec)
    vocab = provider.output_features["targets"].vocabulary
    assert vocab.vocab_size == VOCAB and provider.splits == ("train", "validation")
    batches = pipeline.make_batches(
        spec, "validation", {"inputs": 64, "targets": 8}, batch_size=4, shuffle=False, pack=False
    )
    batch = next(batches)
    with open(data / "validation.jsonl") as f:
        first = [json.loads(line) for line in f][:4]
    for i, row in enumerate(first):
        assert vocab.decode(batch["encoder_input_tokens"][i].tolist()) == row["inputs"]
        assert vocab.decode(batch["decoder_target_tokens"][i].tolist()) == row["targets"]


def test_renamed_fields_and_tsv_give_the_same_examples(data):
    with open(data / "renamed.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(data / "renamed.tsv", "w") as f:
        f.writelines(f"{r['question']}\t{r['answer']}\n" for r in rows)
    jsonl = _spec(data, "jsonl", "renamed.jsonl", "inputs=question,targets=answer")
    tsv = _spec(data, "tsv", "renamed.tsv")
    got = [
        [
            (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
            for ex in evaluation.task_examples(spec, "train", {"inputs": 64, "targets": 8})
        ]
        for spec in (jsonl, tsv)
    ]
    assert got[0] == got[1] == [(r["question"], r["answer"]) for r in rows]


def _write(path, content: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return str(path)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.jsonl", '{"inputs": "a", "targets": "b"}\n{"inputs": "c"}\n', ":2: no field"),
        ("empty.jsonl", "\n\n", "is empty"),
        ("latin1.txt", b"fine\n\ncaf\xe9\n", ":3: not UTF-8 (byte 0xe9 at column 4)"),
        ("broken.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', ":3: not valid JSON"),
        ("list.jsonl", '{"inputs": ["a"], "targets": "b"}\n', ":1: field 'inputs' must be text"),
        ("cols.tsv", "a\tb\nc\td\te\n", ":2: 3 tab-separated columns"),
    ],
)
def test_bad_files_are_one_line_naming_file_and_line(
    tmp_path, monkeypatch, name, content, expected
):
    monkeypatch.setenv("SWITCH_JAX_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path / name, content)
    fmt = {"jsonl": "jsonl", "txt": "text", "tsv": "tsv"}[name.rsplit(".", 1)[1]]
    with pytest.raises(DataError) as e:
        tasks.get_provider(f"{fmt}:{path},vocab=t5")
    message = str(e.value)
    assert "\n" not in message and message.startswith(path) and expected in message, message
    assert not os.listdir(tmp_path / "cache" / "files")  # nothing half-built is left behind


def test_a_glob_that_matches_nothing_is_one_line(tmp_path):
    pattern = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(DataError, match=r"no files match train=.*nothing-\*\.jsonl") as e:
        tasks.get_provider(f"jsonl:{pattern}")
    assert "\n" not in str(e.value)


def test_a_task_without_validation_says_how_to_train_anyway(data):
    spec = _spec(data, "jsonl", "renamed.jsonl", "inputs=question,targets=answer")
    with pytest.raises(DataError, match="add validation=FILES to it.*EVAL_STEPS=0"):
        pipeline.make_dataset(spec, "validation", {"inputs": 64, "targets": 8}, batch_size=2)


def test_too_small_for_the_vocabulary_says_what_fits(data):
    spec = f"text:{data / 'docs.txt'},vocab=trained,vocab_size=4000"
    with pytest.raises(
        DataError, match=r"set vocab_size= to at most \d+ \+ 100 sentinels \(and VOCAB_SIZE"
    ):
        tasks.get_provider(spec)


def _train(model_dir, model_gin, spec, *bindings):
    from switch_jax.training import trainer  # noqa: PLC0415

    gin_config.parse_gin(
        [str(model_gin)],
        [*RUN, f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{spec}'", *bindings],
        [],
    )
    trainer.train(gin_config.load_configs(), operative_config=gin_config.operative_config())
    rows = {}
    for split in ("train", "eval"):
        with open(os.path.join(model_dir, split, "metrics.jsonl")) as f:
            rows[split] = [json.loads(line) for line in f]
    return rows


@pytest.mark.slow
def test_jsonl_trains_five_steps_and_reports_exact_match(data, tmp_path, capsys):
    gin = tmp_path / "model.gin"
    gin.write_text("include 'models/tiny.gin'\n" + MODEL)
    spec = _spec(data, "jsonl", "train.jsonl", f"validation={data / 'validation.jsonl'}")
    rows = _train(
        tmp_path / "run", gin, spec, "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 8}"
    )
    assert [r["step"] for r in rows["train"]][-1] == 5
    task = files.parse(spec).task_name
    (final,) = [r for r in rows["eval"] if f"{task}/exact_match" in r]
    # Every validation record is decoded and scored: the score is a multiple of 100 / 20.
    score = final[f"{task}/exact_match"]
    assert 0 <= score <= 100 and score * VAL_RECORDS / 100 == pytest.approx(
        round(score * VAL_RECORDS / 100)
    )
    with open(data / "validation.jsonl") as f:
        first = json.loads(f.readline())
    assert f"(target {first['targets']!r})" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_a_text_file_with_a_trained_vocabulary_trains(data, tmp_path, architecture):
    gin = tmp_path / "model.gin"
    base = "tiny.gin" if architecture == "encoder_decoder" else "tiny_lm.gin"
    gin.write_text(f"include 'models/{base}'\n" + MODEL)
    objective = "span_corruption" if architecture == "encoder_decoder" else "lm"
    spec = _spec(data, "text", "docs.txt", f"objective={objective}")
    rows = _train(
        tmp_path / "run",
        gin,
        spec,
        "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 16}",
        "EVAL_STEPS = 0",
    )
    losses = [r["loss"] for r in rows["train"]]
    assert len(losses) == 5 and all(0 < x < 2 * VOCAB for x in losses)
    if architecture == "encoder_decoder":  # targets start with <extra_id_0>, the last id
        batch = next(pipeline.make_batches(spec, "train", {"inputs": 32, "targets": 16}, 2))
        assert batch["decoder_target_tokens"][0][0] == VOCAB - 1
    else:  # the LM reads whole documents: its rows are full of text
        lengths = {"targets": 16}
        batch = next(pipeline.make_batches(spec, "train", lengths, 2, "decoder_only"))
        assert (batch["decoder_target_tokens"] != 0).all()


MODULE = """
import seqio
import tensorflow as tf
from switch_jax.data import registry, vocab

_VOCAB = vocab.load_vocabulary({model!r})

def _rows(split, shuffle_files=False, seed=None):
    return tf.data.Dataset.from_tensor_slices({{"inputs": ["gamma delta"], "targets": ["gamma"]}})

registry.add_task(
    "{name}",
    "{name}",
    source=seqio.FunctionDataSource(_rows, splits=("train",)),
    preprocessors=[seqio.preprocessors.tokenize],
    output_features={{k: seqio.Feature(_VOCAB) for k in ("inputs", "targets")}},
)
"""


def _vocab_model(data) -> str:
    spec = _spec(data, "text", "docs.txt")
    return files.vocabulary_path(files.parse(spec), files.prepare(files.parse(spec)))


def test_mixture_or_task_module_registers_the_task_before_lookup(data, tmp_path, monkeypatch):
    (tmp_path / "h5_user_tasks.py").write_text(
        MODULE.format(name="h5_user_task", model=_vocab_model(data))
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    gin_config.parse_gin(
        [],
        ["MIXTURE_OR_TASK_NAME = 'h5_user_task'", "MIXTURE_OR_TASK_MODULE = 'h5_user_tasks'"],
        [],
    )
    configs = gin_config.load_configs()
    options = evaluation.data_options(configs.data)
    assert options == {"module": "h5_user_tasks"}
    lengths = {"inputs": 16, "targets": 16}
    batch = next(pipeline.make_batches("h5_user_task", "train", lengths, 1, pack=False, **options))
    vocab = tasks.get_provider("h5_user_task").output_features["targets"].vocabulary
    assert vocab.decode(batch["decoder_target_tokens"][0].tolist()) == "gamma"
    monkeypatch.delitem(sys.modules, "h5_user_tasks")


def test_mixture_or_task_module_may_be_a_file_path(data, tmp_path):
    path = tmp_path / "by_path.py"
    path.write_text(MODULE.format(name="h5_path_task", model=_vocab_model(data)))
    for _ in range(2):  # a second lookup must not register the task twice
        assert tasks.get_provider("h5_path_task", module=str(path)).name == "h5_path_task"


def test_a_missing_task_module_is_one_line():
    with pytest.raises(DataError, match="no module named 'h5_no_such' on the Python path") as e:
        tasks.get_provider("anything", module="h5_no_such.tasks")
    assert "\n" not in str(e.value)
