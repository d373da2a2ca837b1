"""`python -m switch_jax.infer --gin.MODEL_DIR=D [--input_file=F] [--output_file=O]`: decode or
score with a trained checkpoint (T5X's infer.py).

    python -m switch_jax.infer --gin_file=runs/infer.gin --gin.MODEL_DIR="'runs/demo'" \\
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

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator

import jax
from absl import flags

from switch_jax import checkpoints, cli, evaluation, run_builder, stored_config
from switch_jax.decoding import make_decoder
from switch_jax.evaluation import EOS_ID
from switch_jax.models.config import ConfigError
from switch_jax.run_config import Configs

_INPUT = cli.define_flag(flags.DEFINE_string, "input_file", None, "JSONL / text; '-' = stdin")
_OUTPUT = cli.define_flag(flags.DEFINE_string, "output_file", None, "JSONL out (default stdout)")
_MODE = cli.define_flag(flags.DEFINE_enum, "mode", "predict", ["predict", "score"], "or score")
_STEP = cli.define_flag(flags.DEFINE_string, "step", "latest", "checkpoint: 'latest', 'all', N")
_SPLIT = cli.define_flag(flags.DEFINE_string, "split", "validation", "task split (no input_file)")
_MAX_EXAMPLES = cli.define_flag(flags.DEFINE_integer, "max_examples", None, "at most this many")


class InputError(ValueError):
    """A bad line in --input_file (the message names the line)."""


def read_records(lines: Iterable[str], source: str) -> Iterator[dict]:
    """{'inputs': text | ids, 'targets': ...} per non-empty line (JSON object or plain text)."""
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = line
        if not isinstance(record, dict):
            yield {"inputs": line}
            continue
        if "inputs" not in record:
            raise InputError(f"{source} line {number}: a JSON object needs an 'inputs' key")
        for key in ("inputs", "targets"):
            value = record.get(key)
            ok = value is None or isinstance(value, str)
            ok = ok or (isinstance(value, list) and all(isinstance(v, int) for v in value))
            if not ok:
                raise InputError(f"{source} line {number}: '{key}' must be text or token ids")
        yield record


class _Codec:
    """Text <-> token ids with the task's vocabulary, lengths trimmed the way seqio trims."""

    def __init__(self, configs: Configs, model_cfg):
        from switch_jax.data import tasks  # noqa: PLC0415

        data = configs.data
        options = evaluation.data_options(data)
        features = tasks.get_provider(data.mixture_or_task_name, **options).output_features
        self.inputs_feature = features.get("inputs")
        self.vocab = features["targets"].vocabulary
        self.lengths = dict(data.feature_lengths)
        if not model_cfg.is_encoder_decoder:
            self.lengths.setdefault("inputs", self.lengths["targets"])

    def encode(self, value, key: str) -> list[int]:
        """Token ids of text, or given ids, with EOS appended where the task's feature has one."""
        length = self.lengths[key]
        eos = key == "targets" or (self.inputs_feature is not None and self.inputs_feature.add_eos)
        ids = list(value) if isinstance(value, list) else list(self.vocab.encode(value))
        if not eos:
            return ids[-length:]  # a decoder-only prompt keeps its end, next to the continuation
        if ids and ids[-1] == EOS_ID:
            ids = ids[:-1]
        return ids[: length - 1] + [EOS_ID]

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)


def _task_records(configs: Configs, split: str, lengths, max_examples) -> Iterator[dict]:
    from switch_jax.data import task_info  # noqa: PLC0415

    name = configs.data.mixture_or_task_name
    examples = evaluation.task_examples(name, split, lengths, max_examples)
    vocab = task_info.target_vocabulary(name)
    for ex in examples:
        if "inputs" not in ex:
            raise ConfigError(f"task {name} has no 'inputs' feature; pass --input_file")
        yield {
            "inputs": evaluation.example_text(ex, "inputs", vocab),
            "targets": evaluation.example_text(ex, "targets", vocab),
            "_ids": (ex["inputs"].tolist(), ex["targets"].tolist()),
        }


def infer(
    configs: Configs,
    records: Iterable[dict],
    out,
    *,
    mode: str = "predict",
    step: str = "latest",
    progress=sys.stderr,
    flush_each: bool = False,
) -> dict:
    """Decode (or score) `records`, writing one JSON line per record to `out`; returns totals."""
    run = run_builder.build_run(configs)
    ckpts = run.checkpoints()
    try:
        (chosen,) = checkpoints.select_steps(ckpts, step)
        step_dir = os.fspath(ckpts.directory / str(chosen))
        params = checkpoints.restore_params(step_dir, run.setup.abstract_state.params)
    finally:
        ckpts.close()
    codec = _Codec(configs, run.model_cfg)
    decode_cfg = configs.decode.for_length(codec.lengths["targets"])
    decoder = make_decoder(run.model_cfg, run.partitioner, decode_cfg)
    batch_size = configs.data.batch_size
    totals = {"step": chosen, "examples": 0, "tokens": 0, "seconds": 0.0}
    for chunk in _batches(records, batch_size, flush_each=flush_each):
        started = time.perf_counter()
        rows = _run_batch(decoder, params, codec, chunk, mode, batch_size)
        totals["seconds"] += time.perf_counter() - started
        for row in rows:
            totals["tokens"] += row.pop("_tokens")
            out.write(json.dumps(row) + "\n")
        out.flush()
        totals["examples"] += len(rows)
        if progress is not None and jax.process_index() == 0:
            rate = totals["tokens"] / max(totals["seconds"], 1e-9)
            what = "scored" if mode == "score" else "generated"
            print(f"infer: {totals['examples']} examples, {rate:,.0f} {what} tokens/s",
                  file=progress, flush=True)  # fmt: skip
    return totals


def _batches(records: Iterable[dict], size: int, *, flush_each: bool) -> Iterator[list[dict]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size or flush_each:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_batch(decoder, params, codec: _Codec, chunk, mode, batch_size) -> list[dict]:
    ids = [r.get("_ids") or (codec.encode(r["inputs"], "inputs"), None) for r in chunk]
    inputs = [i for i, _ in ids] + [[]] * (batch_size - len(chunk))
    if mode == "score":
        targets = []
        for r, (_, t) in zip(chunk, ids, strict=True):
            if r.get("targets") is None:
                raise InputError("--mode=score needs 'targets' in every input")
            targets.append(t if t is not None else codec.encode(r["targets"], "targets"))
        targets += [[]] * (batch_size - len(chunk))
        batch = evaluation.score_batch(decoder, inputs, targets, codec.lengths)
        scores = evaluation.to_host(
            decoder.score(params, evaluation.to_global(decoder.partitioner, batch))
        )
        return [
            {**_public(r), "log_likelihood": float(s), "_tokens": len(t)}
            for r, s, t in zip(chunk, scores, targets, strict=False)
        ]
    host = evaluation.generation_batch(decoder, inputs, codec.lengths["inputs"])
    out = evaluation.to_host(
        decoder.generate(params, evaluation.to_global(decoder.partitioner, host))
    )
    rows = []
    for i, r in enumerate(chunk):
        length = int(out["length"][i])
        tokens = evaluation.strip_eos(out["tokens"][i], length)
        as_ids = isinstance(r["inputs"], list)
        row = {**_public(r), "prediction": tokens if as_ids else codec.decode(tokens)}
        row["log_prob"] = float(out["log_prob"][i])
        if "beam_scores" in out:
            row["score"] = float(out["beam_scores"][i, 0])
        rows.append({**row, "_tokens": length})
    return rows


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def main(argv: list[str]) -> None:
    del argv
    cli.parse_gin(stored_config.stored_config_files(flags.FLAGS.gin_bindings))
    configs = cli.configs()
    if not configs.checkpoint.model_dir:
        raise ConfigError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\"")
    stdin = _INPUT.value == "-"
    if _INPUT.value is None:
        lengths = configs.data.feature_lengths
        records = _task_records(configs, _SPLIT.value, lengths, _MAX_EXAMPLES.value)
    elif stdin:
        records = read_records(sys.stdin, "stdin")
    else:
        if not os.path.exists(_INPUT.value):
            raise ConfigError(f"--input_file={_INPUT.value} does not exist")
        with open(_INPUT.value) as f:  # read (and checked) before the model is loaded
            records = list(read_records(f, _INPUT.value))
    if _MAX_EXAMPLES.value is not None and _INPUT.value is not None:
        records = (r for _, r in zip(range(_MAX_EXAMPLES.value), records, strict=False))
    out = open(_OUTPUT.value, "w") if _OUTPUT.value else sys.stdout  # noqa: SIM115
    try:
        totals = infer(
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


run = cli.entry(main, gin=False, extra_errors=(InputError,))  # console script `switch-infer`

if __name__ == "__main__":
    run()
