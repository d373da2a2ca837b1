"""`python -m switch_jax.infer --gin.MODEL_DIR=D [--input_file=F] [--output_file=O]`: decode or
score with a trained checkpoint (T5X's infer.py).

    python -m switch_jax.infer --gin_file=runs/infer.gin --gin.MODEL_DIR="'runs/demo'" \
      --input_file=prompts.jsonl --output_file=predictions.jsonl [--gin.BEAM_SIZE=4]

Inputs: --input_file (JSONL objects with 'inputs' and optionally 'targets', each text or a list
of token ids; any other line is one text input), '-' for stdin (one output line per input line),
or, without --input_file, the --split of the run's task. Outputs (JSONL, --output_file or
stdout): 'inputs', 'prediction', 'log_prob', 'targets' when known ('score' with beam search);
--mode=score writes 'log_likelihood' of the given targets instead. The model, task and
vocabulary come from MODEL_DIR/config.gin unless gin files override them; the checkpoint is the
latest or --step=N. Decoding: gin macros BEAM_SIZE, TEMPERATURE, TOP_K, TOP_P, MAX_DECODE_LENGTH.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from switch_jax import cli
from switch_jax.decode import inference
from switch_jax.models.config import ConfigError
from switch_jax.store import stored_config

_INPUT = cli.define_flag(flags.DEFINE_string, "input_file", None, "JSONL / text; '-' = stdin")
_OUTPUT = cli.define_flag(flags.DEFINE_string, "output_file", None, "JSONL out (default stdout)")
_MODE = cli.define_flag(flags.DEFINE_enum, "mode", "predict", ["predict", "score"], "or score")
_STEP = cli.define_flag(flags.DEFINE_string, "step", "latest", "checkpoint: 'latest', 'all', N")
_SPLIT = cli.define_flag(flags.DEFINE_string, "split", "validation", "task split (no input_file)")
_MAX_EXAMPLES = cli.define_flag(flags.DEFINE_integer, "max_examples", None, "at most this many")


def main(argv: list[str]) -> None:
    del argv
    cli.parse_gin(stored_config.stored_config_files(flags.FLAGS.gin_bindings))
    configs = cli.configs()
    if not configs.checkpoint.model_dir:
        raise ConfigError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    stdin = _INPUT.value == "-"
    if _INPUT.value is None:
        lengths = configs.data.feature_lengths
        records = inference.task_records(configs, _SPLIT.value, lengths, _MAX_EXAMPLES.value)
    elif stdin:
        records = inference.read_records(sys.stdin, "stdin")
    else:
        if not os.path.exists(_INPUT.value):
            raise ConfigError(f"--input_file={_INPUT.value} does not exist")
        with open(_INPUT.value) as f:  # read (and checked) before the model is loaded
            records = list(inference.read_records(f, _INPUT.value))
    if _MAX_EXAMPLES.value is not None and _INPUT.value is not None:
        records = (r for _, r in zip(range(_MAX_EXAMPLES.value), records, strict=False))
    out = open(_OUTPUT.value, "w") if _OUTPUT.value else sys.stdout  # noqa: SIM115
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
    rate = totals["tokens"] / max(totals["seconds"], 1e-9)
    where = _OUTPUT.value or "stdout"
    print(
        f"infer: step {totals['step']}, {totals['examples']} examples, {totals['tokens']:,} "
        f"tokens in {totals['seconds']:.1f} s ({rate:,.0f} tokens/s) -> {where}",
        file=sys.stderr,
        flush=True,
    )


console_main = cli.entry(
    main, gin=False, extra_errors=(inference.InputError,)
)  # console script `switch-inference.infer`


if __name__ == "__main__":
    console_main()
