"""Decode or score records with a trained checkpoint (`switch-infer` is the command).

    records = read_records(lines, "prompts.jsonl")   # dicts; InputError names a bad line
    totals = infer(configs, records, out, mode="predict")  # JSONL rows to `out`
    print(summary(totals, "predictions.jsonl"), file=sys.stderr)  # the one closing line

A record has 'inputs' and optionally 'targets', each text or a list of token ids (any line that
is not a JSON object is one text input). Rows written: 'inputs', 'prediction', 'log_prob',
'targets' when known ('score' with beam search, 'seed' when sampling); with
NUM_RETURN_SEQUENCES > 1 also 'predictions', best first: [{'text' (or 'tokens' for id inputs),
'score' (beams), 'log_prob'}, ...]. mode="score" writes 'log_likelihood' of the given targets
instead. Sampling keys: DECODE_SEED folded with the batch's index, so a rerun with the same seed
and BATCH_SIZE draws the same samples.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator

import jax

from switch_jax.config.settings import Configs
from switch_jax.decode import evaluation
from switch_jax.decode.decoding import make_decoder, precompile
from switch_jax.decode.evaluation import EOS_ID
from switch_jax.models.config import ConfigError
from switch_jax.store import checkpoints
from switch_jax.training import build, losses


class InputError(ValueError):
    """A bad line in --input_file (the message names the line)."""


def read_records(
    lines: Iterable[str | bytes],
    source: str,
    *,
    vocab_size: int | None = None,
    need_targets: bool = False,
) -> Iterator[dict]:
    """{'inputs': text | ids, 'targets': ...} per non-empty line (JSON object or plain text).

    A line that starts with '{' is a JSON object, and one that does not parse is an error, never
    a prompt: a truncated record would otherwise be decoded (or scored) as prose.

    Args:
      lines: the file's lines, text or bytes (bytes must be UTF-8).
      source: the file's name, for the messages.
      vocab_size: token ids given as lists must lie in [0, vocab_size).
      need_targets: every record must have 'targets' (--mode=score).

    Raises:
      InputError: one line naming `source`, the line number and what to fix.
    """
    for number, raw in enumerate(lines, 1):
        where = f"{source} line {number}"
        line = _text(raw, where).rstrip("\r\n")
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            if need_targets:
                raise InputError(f"{where}: --mode=score needs JSON objects with 'targets'")
            yield {"inputs": line}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{where}: invalid JSON object ({e.msg} at column {e.colno}); complete it, or "
                "write the prompt as plain text without a leading '{'"
            ) from None
        _check_record(record, where, vocab_size, need_targets)
        yield record


def _text(raw: str | bytes, where: str) -> str:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "the input file must be JSONL or plain text"
            ) from None
    if "\x00" in raw:
        raise InputError(f"{where}: holds NUL bytes (a binary file?); give JSONL or plain text")
    return raw


def _check_record(record, where: str, vocab_size: int | None, need_targets: bool) -> None:
    if not isinstance(record, dict) or "inputs" not in record:
        raise InputError(f"{where}: a JSON object needs an 'inputs' key")
    if need_targets and record.get("targets") is None:
        raise InputError(f"{where}: --mode=score needs 'targets' in every input")
    for key in ("inputs", "targets"):
        value = record.get(key)
        if value is None or isinstance(value, str):
            continue
        ids = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if not ids:
            raise InputError(f"{where}: '{key}' must be text or a list of token ids")
        bad = [v for v in value if v < 0 or (vocab_size is not None and v >= vocab_size)]
        if bad:
            raise InputError(
                f"{where}: '{key}' has token id {bad[0]} outside the vocabulary "
                f"[0, {vocab_size}) of the model"
            )


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


def task_records(configs: Configs, split: str, lengths, max_examples) -> Iterator[dict]:
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
    progress_every: float = 30.0,
) -> dict:
    """Decode (or score) `records`, writing one JSON line per record to `out`.

    Returns the totals `summary` reads: step, mode, examples, tokens, seconds (decoding only),
    compile_seconds, seed (None unless sampling). A progress line goes to `progress` at most
    every `progress_every` seconds, so a short run prints nothing before its summary.
    """
    # The label objective: inference needs no distillation teacher, only the params' shapes.
    run = build.build_run(configs, objective=losses.LABELS)
    ckpts = run.checkpoints()
    try:
        (chosen,) = checkpoints.select_steps(ckpts, step)
        step_dir = os.fspath(ckpts.step_dir(chosen))
        params = checkpoints.restore_params(step_dir, run.abstract_params)
    finally:
        ckpts.close()
    codec = _Codec(configs, run.model_cfg)
    decode_cfg = configs.decode.for_length(codec.lengths["targets"])
    runner = _Runner(make_decoder(run.model_cfg, run.partitioner, decode_cfg), params, mode)
    sampling = mode == "predict" and decode_cfg.beam_size == 1 and decode_cfg.temperature > 0
    totals = {"step": chosen, "mode": mode, "examples": 0, "tokens": 0}
    totals["seed"] = decode_cfg.seed if sampling else None
    shown = time.perf_counter()
    batches = _batches(records, configs.data.batch_size, flush_each=flush_each)
    for index, chunk in enumerate(batches):
        rows = _run_batch(runner, codec, chunk, index, configs.data.batch_size)
        for row in rows:
            totals["tokens"] += row.pop("_tokens")
            out.write(json.dumps(row) + "\n")
        out.flush()
        totals["examples"] += len(rows)
        if progress is not None and time.perf_counter() - shown >= progress_every:
            shown = time.perf_counter()
            if jax.process_index() == 0:
                rate = _per_second(totals["tokens"], runner.seconds)
                print(f"infer: {totals['examples']:,} examples so far, {rate} tokens/s",
                      file=progress, flush=True)  # fmt: skip
    return {**totals, "seconds": runner.seconds, "compile_seconds": runner.compile_seconds}


def summary(totals: dict, where: str) -> str:
    """The one line `switch-infer` ends with: tokens/s counts decoding after compilation."""
    line = f"infer: step {totals['step']}, {totals['examples']:,} examples"
    if totals["examples"]:
        what = "scored" if totals["mode"] == "score" else "generated"
        line += (
            f", {totals['tokens']:,} {what} tokens in {totals['seconds']:.2f} s "
            f"({_per_second(totals['tokens'], totals['seconds'])} tokens/s; "
            f"compiling took {totals['compile_seconds']:.1f} s more)"
        )
    if totals.get("seed") is not None:
        line += f", seed {totals['seed']}"
    return f"{line} -> {where}"


def _per_second(tokens: int, seconds: float) -> str:
    rate = tokens / max(seconds, 1e-9)
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"  # a slow rate never reads "0"


class _Runner:
    """The decoder's generate (or score), compiled at the first batch, timed apart from it."""

    def __init__(self, decoder, params, mode: str):
        self.decoder, self.params, self.mode = decoder, params, mode
        self.key = jax.random.PRNGKey(decoder.config.seed)
        self.compile_seconds = self.seconds = 0.0
        self._call = None

    def __call__(self, host_batch: dict, index: int):
        batch = evaluation.to_global(self.decoder.partitioner, host_batch)
        if self.mode == "score":
            jitted, rest = self.decoder.score_jitted, ()
        else:
            # A key per batch: the same input in two batches gets two independent draws.
            jitted, rest = self.decoder.generate_jitted, (jax.random.fold_in(self.key, index),)
        if self._call is None:
            started = time.perf_counter()
            self._call = precompile(self.decoder, jitted, self.params, batch, *rest)
            self.compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        out = evaluation.to_host(self._call(self.params, batch, *rest))
        self.seconds += time.perf_counter() - started
        return out


def _batches(records: Iterable[dict], size: int, *, flush_each: bool) -> Iterator[list[dict]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size or flush_each:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_batch(runner: _Runner, codec: _Codec, chunk, index: int, batch_size) -> list[dict]:
    ids = [r.get("_ids") or (codec.encode(r["inputs"], "inputs"), None) for r in chunk]
    inputs = [i for i, _ in ids] + [[]] * (batch_size - len(chunk))
    decoder = runner.decoder
    if runner.mode == "score":
        targets = []
        for r, (_, t) in zip(chunk, ids, strict=True):
            if r.get("targets") is None:
                raise InputError("--mode=score needs 'targets' in every input")
            targets.append(t if t is not None else codec.encode(r["targets"], "targets"))
        targets += [[]] * (batch_size - len(chunk))
        scores = runner(evaluation.score_batch(decoder, inputs, targets, codec.lengths), index)
        return [
            {**_public(r), "log_likelihood": float(s), "_tokens": len(t)}
            for r, s, t in zip(chunk, scores, targets, strict=False)
        ]
    out = runner(evaluation.generation_batch(decoder, inputs, codec.lengths["inputs"]), index)
    return [_prediction_row(out, i, r, codec, decoder.config) for i, r in enumerate(chunk)]


def _prediction_row(out: dict, i: int, record: dict, codec: _Codec, cfg) -> dict:
    """'prediction' (the best), its 'log_prob' ('score' for beams), and with n-best the
    'predictions' list, best first; '_tokens' counts every returned sequence's tokens."""
    as_ids = isinstance(record["inputs"], list)

    def shown(tokens, length):
        stripped = evaluation.strip_eos(tokens, int(length))
        return stripped if as_ids else codec.decode(stripped)

    beam = "beam_scores" in out
    row = {**_public(record), "prediction": shown(out["tokens"][i], out["length"][i])}
    row["log_prob"] = float(out["log_prob"][i])
    if beam:
        row["score"] = float(out["beam_scores"][i, 0])
    if not beam and cfg.temperature > 0:
        row["seed"] = cfg.seed
    n = cfg.num_return_sequences
    if n == 1:
        return {**row, "_tokens": int(out["length"][i])}
    kind = "beam" if beam else "sample"
    lengths = out[f"{kind}_lengths"][i, :n]
    nbest = []
    for k in range(n):
        entry = {("tokens" if as_ids else "text"): shown(out[f"{kind}_tokens"][i, k], lengths[k])}
        if beam:
            entry["score"] = float(out["beam_scores"][i, k])
        entry["log_prob"] = float(out[f"{kind}_log_probs"][i, k])
        nbest.append(entry)
    return {**row, "predictions": nbest, "_tokens": int(lengths.sum())}


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}
