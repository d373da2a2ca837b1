"""Bad input at every command, as a new user types it: refused in one line, nothing touched.

Each case runs a command's console entry in this process (flags, gin, hosts and the one-line
error of switch_jax.cli, as `switch-X ARGS` would) inside a fresh folder, and checks: a non-zero
exit, a last stderr line that names the flag, value or file at fault, no traceback anywhere, and
the folder's tree (every path and every file's bytes) the same before and after. A run to read
("run") is laid out by hand: config.gin and a committed step folder are all that the checks
made before any model is built look at.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from tests.console_entry import invoke

pytest.importorskip("seqio")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf", "switch_tiny")
RUN = "--gin.MODEL_DIR=run"


def _tree(root: str) -> dict[str, str]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root) + "/"] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _lay_out(root) -> None:
    """A run, a run-less folder, input files and an HF source with damaged files."""
    os.makedirs(root / "run" / "checkpoints" / "1" / "state")
    (root / "run" / "config.gin").write_text("include 'runs/demo.gin'\n")
    (root / "empty_run").mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "binary.jsonl").write_bytes(b'{"inputs": "a"}\n\xff\xfe\x00\x81 bytes\n')
    (root / "nul.txt").write_bytes(b"\x00" * 64)
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n  \n\n")
    (root / "truncated.jsonl").write_text('{"inputs": "fine"}\n{"inputs": "cut sh\n')
    (root / "ids_big.jsonl").write_text('{"inputs": [5, 8192]}\n')
    (root / "ids_negative.jsonl").write_text('{"inputs": [-1, 5]}\n')
    (root / "ids_float.jsonl").write_text('{"inputs": [1.5, 2]}\n')
    (root / "no_inputs.jsonl").write_text('{"prompt": "hello"}\n')
    (root / "no_targets.jsonl").write_text('{"inputs": "a", "targets": "b"}\n{"inputs": "c"}\n')
    for name, damage in (
        ("hf_short_weights", lambda d: _truncate(d / "model.safetensors", 1000)),
        ("hf_half_weights", lambda d: _truncate(d / "model.safetensors", None)),
        ("hf_short_config", lambda d: _truncate(d / "config.json", 300)),
        ("hf_list_config", lambda d: (d / "config.json").write_text("[1, 2]\n")),
    ):
        shutil.copytree(HF_FIXTURE, root / name)
        damage(root / name)
    (root / "plot_list" / "train").mkdir(parents=True)
    (root / "plot_list" / "train" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[3]\n')
    (root / "plot_run" / "train").mkdir(parents=True)
    (root / "plot_run" / "train" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')


def _truncate(path, size) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    _lay_out(root)
    return root


@pytest.fixture
def workdir(layout, tmp_path, monkeypatch):
    """A private copy of the layout as the current directory; its tree must stay the same."""
    root = tmp_path / "w"
    shutil.copytree(layout, root)
    monkeypatch.chdir(root)
    before = _tree(str(root))
    yield root
    assert _tree(str(root)) == before, "a refused command created, changed or deleted files"


def _run(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    """`switch-COMMAND ARGS` in this process: (exit status, stdout, stderr)."""
    status = invoke(command, args)
    out = capsys.readouterr()
    return status, out.out, out.err


TRAIN = ["--gin_file=runs/demo.gin", "--gin.MODEL_DIR=new_run", "--gin.BATCH_SIZE=8"]
HF = ["--from=hf", "--model_dir=converted"]
CASES = [
    # train: refused before MODEL_DIR is created (or the new one is removed again)
    (
        "train",
        ["--gin_file=run/demo.gin", "--gin.MODEL_DIR=new_run"],
        "did you mean 'runs/demo.gin'",
    ),
    (
        "train",
        [*TRAIN, "--gin.MIXTURE_OR_TASK_NAME=c4_span"],
        "did you mean c4_v301_span_corruption",
    ),
    ("train", [*TRAIN, "--gin.TASK_FEATURE_LENGTHS={'targets': 16}"], "TASK_FEATURE_LENGTHS="),
    ("train", [*TRAIN, "--gin.TRAIN_STEP=5"], "unknown gin macro 'TRAIN_STEP'"),
    (
        "train",
        [*TRAIN, "--mode=score"],
        "--mode: it is a flag of switch-infer, not of switch-train",
    ),
    ("train", [*TRAIN, "--process_count=0"], "flag --process_count=0"),
    ("train", [*TRAIN, "--process_index=-1"], "flag --process_index=-1"),
    ("train", [*TRAIN, "--distributed_timeout_s=0"], "flag --distributed_timeout_s=0"),
    ("train", [*TRAIN, "--gin.MESH_SHAPE=(3, 1, 1)"], "MESH_SHAPE=(3, 1, 1) has 3 devices"),
    ("train", [*TRAIN, "--gin.BATCH_SIZE=6"], "BATCH_SIZE=6 must be divisible"),
    ("train", ["--gin_file=runs/demo.gin", "--gin.MODEL_DIR=a_file"], "MODEL_DIR=a_file is a file"),
    ("train", [*TRAIN, "extra"], "unexpected arguments ['extra']"),
    # eval: a MODEL_DIR without a run is named, never created
    ("eval", ["--gin.MODEL_DIR=rnu"], "MODEL_DIR=rnu does not exist; did you mean run?"),
    ("eval", ["--gin.MODEL_DIR=empty_run"], "MODEL_DIR=empty_run holds no checkpoint"),
    ("eval", ["--gin.MODEL_DIR=a_file"], "MODEL_DIR=a_file is a file"),
    ("eval", [RUN, "--step=7"], "--step=7: run has checkpoints of steps 1"),
    ("eval", [RUN, "--step=last"], "--step=last must be 'latest', 'all' or a step number"),
    ("eval", [], "MODEL_DIR is not set"),
    ("eval", [RUN, "--topology=v5p-8"], "--topology: it is a flag of switch-compile"),
    ("eval", [RUN, "--gin_file=runs/evl.gin"], "did you mean 'runs/eval.gin'"),
    ("eval", ["--gin.MODEL_DIR=a b"], "--gin.MODEL_DIR=a b must be a quoted string"),
    # infer: the input file is read and checked before the model loads
    ("infer", [RUN, "--input_file=binary.jsonl"], "binary.jsonl line 2: not UTF-8 text"),
    ("infer", [RUN, "--input_file=nul.txt"], "nul.txt line 1: holds NUL bytes"),
    ("infer", [RUN, "--input_file=empty.jsonl"], "--input_file=empty.jsonl holds no input"),
    ("infer", [RUN, "--input_file=blank.jsonl"], "--input_file=blank.jsonl holds no input"),
    ("infer", [RUN, "--input_file=truncated.jsonl"], "truncated.jsonl line 2: invalid JSON"),
    ("infer", [RUN, "--input_file=ids_big.jsonl"], "line 1: 'inputs' has token id 8192 outside"),
    ("infer", [RUN, "--input_file=ids_negative.jsonl"], "line 1: 'inputs' has token id -1"),
    ("infer", [RUN, "--input_file=ids_float.jsonl"], "line 1: 'inputs' must be text or a list"),
    ("infer", [RUN, "--input_file=no_inputs.jsonl"], "line 1: a JSON object needs an 'inputs'"),
    (
        "infer",
        [RUN, "--input_file=no_targets.jsonl", "--mode=score"],
        "no_targets.jsonl line 2: --mode=score needs 'targets'",
    ),
    ("infer", [RUN, "--input_file=x.jsonl", "--mode=scor"], "flag --mode=scor"),
    ("infer", [RUN, "--input_file=missing.jsonl"], "--input_file=missing.jsonl does not exist"),
    ("infer", [RUN, "--input_file=run"], "--input_file=run is a directory"),
    ("infer", [RUN, "--input_file=-", "--output_file=run"], "--output_file=run is a directory"),
    ("infer", [RUN, "--input_file=-", "--output_file=no/o.jsonl"], "its folder does not exist"),
    ("infer", [RUN, "--step=all"], "--step=all is for switch-eval"),
    ("infer", [RUN, "--max_examples=0"], "flag --max_examples=0"),
    ("infer", ["--gin.MODEL_DIR=rnu", "--input_file=-"], "MODEL_DIR=rnu does not exist"),
    ("infer", [RUN, "prompts.jsonl"], "unexpected arguments ['prompts.jsonl']"),
    # info / compile: device counts and flags of other commands
    ("info", ["--gin_file=models/tiny.gin", "--num_devices=0"], "flag --num_devices=0"),
    ("info", ["--gin_file=models/tiny.gin", "--num_devices=-8"], "flag --num_devices=-8"),
    ("info", ["--gin_file=models/tiny.gin", "--topology=v5p-8"], "it is a flag of switch-compile"),
    ("info", ["--gin_file=models/tiny_ml.gin"], "did you mean 'models/tiny_lm.gin'"),
    (
        "info",
        ["--gin_file=models/tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64}"],
        "has no 'targets'",
    ),
    ("info", ["--gin_file=models/tiny.gin", "--json=3"], "flag --json=3"),
    (
        "info",
        ["--gin_file=models/tiny.gin", "--gin.MESH_SHAPE=(-2, 1, 1)"],
        "MESH_SHAPE=(-2, 1, 1)",
    ),
    ("info", ["--gin_file=models/tiny.gin", "--gin.MESH_SHAPE=(0, 1, 1)"], "MESH_SHAPE=(0, 1, 1)"),
    ("compile", ["--gin_file=models/tiny.gin"], "--topology is required"),
    ("compile", ["--gin_file=models/tiny.gin", "--num_slices=0"], "flag --num_slices=0"),
    ("compile", ["--gin_file=models/tiny.gin", "--num_devices=8"], "it is a flag of switch-info"),
    # convert: damaged HF files are named, nothing is written
    ("convert", [*HF, "--source=hf_short_weights"], "model.safetensors is not a readable"),
    ("convert", [*HF, "--source=hf_half_weights"], "model.safetensors is not a readable"),
    ("convert", [*HF, "--source=hf_short_config"], "config.json line 14: invalid JSON"),
    ("convert", [*HF, "--source=hf_list_config"], "config.json holds a JSON list"),
    ("convert", [*HF, "--source=nowhere"], "--source=nowhere is not a directory"),
    ("convert", ["--model_dir=converted"], "give exactly one of --from"),
    ("convert", ["--from=hf", "--model_dir=converted"], "--source is required"),
    ("convert", ["--to=hf", "--model_dir=rnu", "--output=hf"], "has no config.gin; did you mean"),
    ("convert", ["--to=hf", "--model_dir=run", "--expert_capacity=0"], "flag --expert_capacity=0"),
    ("convert", ["--from=onnx", "--source=run", "--model_dir=x"], "flag --from=onnx"),
    # plot
    ("plot", ["plot_list"], "metrics.jsonl line 2: not a metrics row"),
    ("plot", ["plot_run", "--out", "a_file"], "--out=a_file is a file, not a folder"),
    ("plot", ["plot_rnu"], "MODEL_DIR=plot_rnu is not a directory; did you mean plot_run?"),
    ("plot", ["empty_run"], "MODEL_DIR=empty_run has no train/ or eval/ metrics.jsonl"),
    ("plot", [], "the following arguments are required: model_dir"),
    # bench: counts
    ("bench", ["--gin_file=models/tiny.gin", "--steps=0"], "flag --steps=0"),
    ("bench", ["--gin_file=models/tiny.gin", "--steps=ten"], "flag --steps=ten"),
    ("bench", ["--gin_file=models/tiny.gin", "--warmup=-1"], "flag --warmup=-1"),
    ("bench", ["--gin_file=models/tiny.gin", "--dispatch_groups=256,x"], "'x' is not a positive"),
    ("bench", ["--gin_file=models/tiny.gin", "--dispatch_experts=0"], "'0' is not a positive"),
    ("bench", ["--gin_file=models/tiny.gin", "--variants=stepz"], "--variants: unknown ['stepz']"),
    ("bench", ["--gin_file=models/tiny.gin", "--dispatches=fast"], "--dispatches: unknown"),
]


@pytest.mark.parametrize(
    "command, args, names", CASES, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)]
)
def test_refused_in_one_line_with_nothing_touched(workdir, capsys, command, args, names):
    status, out, err = _run(command, args, capsys)
    assert status not in (0, None), (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, out
    assert names in lines[-1], lines[-1]
    assert len(lines[-1]) < 300, lines[-1]
    assert "Traceback" not in out + err
    assert "Pass --helpshort" not in lines[-1]
    assert "(new run)" not in out  # no start announced before a refusal


def test_at_least_fifty_cases_over_every_command():
    assert len(CASES) >= 50
    commands = {c for c, *_ in CASES}
    assert commands == {"train", "eval", "infer", "info", "compile", "convert", "plot", "bench"}
