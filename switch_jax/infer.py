"""`python -m switch_jax.infer --gin.MODEL_DIR=D [--input_file=F] [--output_file=O]`: decode or
score with a trained checkpoint (T5X's infer.py).

    python -m switch_jax.infer --gin_file=runs/infer.gin --gin.MODEL_DIR="'runs/demo'" \\
      --input_file=prompts.jsonl --output_file=predictions.jsonl [--gin.BEAM_SIZE=4]

Inputs: --input_file (JSONL objects with 'inputs' and optionally 'targets', each text or a list
of token ids; any other line is one text input), '-' for stdin (one output line per input line),
or, without --input_file, the --split of the run's task. Outputs (JSONL, --output_file or
stdout): 'inputs', 'prediction', 'log_prob', 'targets' when known ('score' with beam search,
'seed' when sampling); --mode=score writes 'log_likelihood' of the given targets instead.
N-best: --gin.NUM_RETURN_SEQUENCES=N adds 'predictions', best first, each with its 'text' and
'score' (the top N <= BEAM_SIZE beams) or 'log_prob' (N samples when TEMPERATURE > 0); greedy
decoding has one answer and refuses N > 1. --gin.DECODE_SEED=S (default 0) picks the samples.
The model, task and vocabulary come from MODEL_DIR/config.gin unless gin files override them;
the checkpoint is the latest or --step=N. Decoding: gin macros BEAM_SIZE, TEMPERATURE, TOP_K,
TOP_P, MAX_DECODE_LENGTH. It ends with one line on stderr: step, examples, tokens, decoding
tokens/s (compilation timed apart), the seed when sampling, and where the output went.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from switch_jax import cli
from switch_jax.decode import inference
from switch_jax.models.config import ConfigError

_INPUT = cli.define_flag(flags.DEFINE_string, "input_file", None, "JSONL / text; '-' = stdin")
_OUTPUT = cli.define_flag(flags.DEFINE_string, "output_file", None, "JSONL out (default stdout)")
_MODE = cli.define_flag(
    flags.DEFINE_enum, "mode", "predict", ["predict", "score"], "decode, or score the targets"
)
_STEP = cli.define_flag(flags.DEFINE_string, "step", "latest", "checkpoint: 'latest', 'all', N")
_SPLIT = cli.define_flag(flags.DEFINE_string, "split", "validation", "task split (no input_file)")
_MAX_EXAMPLES = cli.define_flag(
    flags.DEFINE_integer, "max_examples", None, "at most this many", lower_bound=1
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --input_file=F")
    if _STEP.value == "all":
        raise ConfigError("--step=all is for switch-eval; infer uses one: 'latest' or a step")
    configs = cli.stored_run_configs(_STEP.value)
    _check_output(_OUTPUT.value)
    stdin = _INPUT.value == "-"
    options = dict(vocab_size=configs.model.vocab_size, need_targets=_MODE.value == "score")
    if _INPUT.value is None:
        cli.check_task(configs)
        lengths = configs.data.feature_lengths
        records = inference.task_records(configs, _SPLIT.value, lengths, _MAX_EXAMPLES.value)
    elif stdin:
        records = inference.read_records(
            getattr(sys.stdin, "buffer", sys.stdin), "stdin", **options
        )
    else:
        records = _read_file(_INPUT.value, options)
        cli.check_task(configs)
    if _MAX_EXAMPLES.value is not None and _INPUT.value is not None:
        records = (r for _, r in zip(range(_MAX_EXAMPLES.value), records, strict=False))
    out = _OpenOnWrite(_OUTPUT.value) if _OUTPUT.value else sys.stdout
    try:
        totals = inference.infer(
            configs,
            records,
            out,
            mode=_MODE.value,
            step=_STEP.value,
            progress=None if stdin else sys.stderr,
            flush_each=stdin,  # answer each line as it arrives
        )
    finally:
        if out is not sys.stdout:
            out.close()
    where = _OUTPUT.value or "stdout"
    if jax.process_index() == 0:
        print(inference.summary(totals, where), file=sys.stderr, flush=True)


def _read_file(path: str, options: dict) -> list[dict]:
    """Every record of --input_file, read (and checked) before the model is loaded."""
    if not os.path.exists(path):
        raise ConfigError(f"--input_file={path} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"--input_file={path} is a directory; give a JSONL or text file")
    with open(path, "rb") as f:
        records = list(inference.read_records(f, path, **options))
    if not records:
        raise inference.InputError(f"--input_file={path} holds no input (empty or blank lines)")
    return records


class _OpenOnWrite:
    """--output_file, created at the first row: a run refused while loading leaves no file."""

    def __init__(self, path: str):
        self.path, self._file = path, None

    def write(self, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "w")  # noqa: SIM115  (closed by close())
        self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_output(path: str | None) -> None:
    if path and os.path.isdir(path):
        raise ConfigError(f"--output_file={path} is a directory; give a file name")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"--output_file={path}: its folder does not exist; create it first")


console_main = cli.entry(
    main, gin=False, extra_errors=(inference.InputError,)
)  # console script `switch-infer`


if __name__ == "__main__":
    console_main()
