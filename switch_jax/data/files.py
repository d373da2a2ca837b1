"""Tasks named by their files: MIXTURE_OR_TASK_NAME='jsonl:data/train-*.jsonl,validation=...'.

The spec is FORMAT:TRAIN_GLOB followed by comma-separated key=value options (docs/data.md):
  jsonl  one JSON object a line: 'inputs' and 'targets' (supervised, scored by exact match), or
         'text' (span corruption / LM); other field names via inputs=F,targets=F,text=F
  tsv    'inputs<TAB>targets' a line, or one column of text
  text   one document a line
Every file is read once at first use: bad lines are one-line errors naming file:line, and JSONL /
TSV rows are written to TFRecord shards in the cache (one per file, so hosts still shard by
file). A `vocab=trained` SentencePiece model is trained on the training split and cached beside.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile

import seqio
import tensorflow as tf

from switch_jax.data import corpus as corpus_lib
from switch_jax.data import registry, task_metrics
from switch_jax.data.errors import DataError
from switch_jax.data.vocab import NUM_SENTINELS, T5_VOCAB, load_vocabulary

FORMATS = ("jsonl", "tsv", "text")
OBJECTIVES = ("supervised", "span_corruption", "lm")
_OPTIONS = ("train", "validation", "vocab", "vocab_size", "objective", "name")
_FIELDS = ("inputs", "targets", "text")
CACHE_VERSION = 1  # bump when the cached shards' layout changes
MAX_VOCAB_SENTENCES = 1_000_000  # SentencePiece keeps its whole input in memory
_REGISTERED: dict[str, str] = {}  # spec -> the seqio task name it registered


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """A parsed MIXTURE_OR_TASK_NAME naming files."""

    spec: str
    format: str
    train: str
    validation: str | None = None
    vocab: str | None = None  # 'embedded' | 't5' | 'trained' | a SentencePiece model path
    vocab_size: int = corpus_lib.DEFAULT_VOCAB_SIZE  # for vocab=trained, sentinels included
    objective: str | None = None  # None: supervised when rows have inputs/targets, else span
    fields: tuple[tuple[str, str], ...] = tuple((f, f) for f in _FIELDS)
    name: str | None = None

    def field(self, role: str) -> str:
        return dict(self.fields)[role]

    @property
    def task_name(self) -> str:
        """The seqio task name: `name=`, else format and the train glob's last two parts."""
        if self.name:
            return self.name
        parts = [p for p in re.split(r"[\\/]", self.train) if p not in ("", ".", "..")][-2:]
        stem = "_".join(parts).rsplit(".", 1)[0] if "." in parts[-1] else "_".join(parts)
        return f"{self.format}_{re.sub(r'[^0-9A-Za-z_]+', '_', stem).strip('_')}"


def is_spec(name: str) -> bool:
    """True when a task name names files ('jsonl:...', 'tsv:...', 'text:...')."""
    return name.split(":", 1)[0] in FORMATS and ":" in name


def _bad(spec: str, message: str) -> DataError:
    return DataError(f"MIXTURE_OR_TASK_NAME={spec!r}: {message} (see docs/data.md)")


def parse(spec: str) -> FileSpec:
    """Parse 'FORMAT:TRAIN_GLOB[,key=value...]' (the first item may also be 'train=GLOB')."""
    fmt, _, rest = spec.partition(":")
    if fmt not in FORMATS:
        raise _bad(spec, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    values, fields = {}, {f: f for f in _FIELDS}
    for i, item in enumerate(p.strip() for p in rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq and i == 0:
            key, value = "train", item
        elif not eq or not value:
            raise _bad(spec, f"{item!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key in _FIELDS:
            if fmt != "jsonl":
                raise _bad(spec, f"{key}= renames a JSONL field; {fmt} files have no field names")
            fields[key] = value
        elif key in _OPTIONS and key not in values:
            values[key] = value
        else:
            known = ", ".join(_OPTIONS + _FIELDS)
            raise _bad(spec, f"option {key!r} is unknown or repeated (options: {known})")
    if not values.get("train"):
        raise _bad(spec, "no training files; write e.g. 'jsonl:data/train-*.jsonl'")
    objective = values.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise _bad(spec, f"objective={objective} is not one of {', '.join(OBJECTIVES)}")
    if fmt == "text" and objective == "supervised":
        raise _bad(spec, "text files hold documents; use jsonl or tsv for inputs and targets")
    try:
        vocab_size = int(values.pop("vocab_size", corpus_lib.DEFAULT_VOCAB_SIZE))
    except ValueError:
        raise _bad(spec, "vocab_size must be an integer") from None
    if vocab_size <= NUM_SENTINELS + 3:
        raise _bad(spec, f"vocab_size={vocab_size} leaves no room beside {NUM_SENTINELS} sentinels")
    return FileSpec(
        spec=spec,
        format=fmt,
        vocab_size=vocab_size,
        fields=tuple(fields.items()),
        **values,
    )


# --- reading and checking the files --------------------------------------------------------


def _glob(spec: FileSpec, split: str, pattern: str) -> list[str]:
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
        where = f"under {os.getcwd()}" if "://" not in pattern else "there"
        raise _bad(spec.spec, f"no files match {split}={pattern!r} ({where})")
    return paths


def _open(path: str):
    return open(path, "rb") if "://" not in path else tf.io.gfile.GFile(path, "rb")


def _lines(path: str):
    """(line number, text) of the non-blank lines of a UTF-8 file."""
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); save the file as UTF-8"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if line.strip():
                yield number, line


def _json_row(spec: FileSpec, where: str, line: str, kind: str | None) -> tuple[str, dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSONL line must be an object, got {type(record).__name__}")
    if kind is None:
        kind = "supervised" if spec.field("inputs") in record else "text"
    roles = ("inputs", "targets") if kind == "supervised" else ("text",)
    row = {}
    for role in roles:
        field = spec.field(role)
        if field not in record:
            want = "'inputs' and 'targets'" if kind == "supervised" else "'text'"
            raise DataError(
                f"{where}: no field {field!r} (fields: {', '.join(map(repr, record))}); "
                f"records need {want}, or name yours in MIXTURE_OR_TASK_NAME with {role}=FIELD"
            )
        value = record[field]
        if isinstance(value, (dict, list)) or value is None:
            raise DataError(f"{where}: field {field!r} must be text, got {json.dumps(value)[:40]}")
        row[role] = value if isinstance(value, str) else str(value)
    return kind, row


def _tsv_row(where: str, line: str, kind: str | None) -> tuple[str, dict]:
    columns = line.split("\t")
    if kind is None and len(columns) in (1, 2):
        kind = "supervised" if len(columns) == 2 else "text"
    if len(columns) != (2 if kind == "supervised" else 1):
        raise DataError(
            f"{where}: {len(columns)} tab-separated columns; every line must be "
            "'inputs<TAB>targets', or every line one column of text"
        )
    roles = ("inputs", "targets") if kind == "supervised" else ("text",)
    return kind, dict(zip(roles, columns, strict=True))


def rows(spec: FileSpec, path: str, kind: str | None):
    """Yield (kind, row) of a file: kind 'supervised' ({'inputs', 'targets'}) or 'text'."""
    for number, line in _lines(path):
        where = f"{path}:{number}"
        if spec.format == "jsonl":
            kind, row = _json_row(spec, where, line, kind)
        elif spec.format == "tsv":
            kind, row = _tsv_row(where, line, kind)
        else:
            kind, row = "text", {"text": line}
        yield kind, row


def _wanted_kind(spec: FileSpec) -> str | None:
    if spec.objective is None:
        return None
    return "supervised" if spec.objective == "supervised" else "text"


def _example(row: dict) -> bytes:
    feature = {
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
        for k, v in row.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _check_and_convert(spec: FileSpec, splits: dict, directory: str) -> dict:
    """Read every file once; JSONL / TSV rows go to one TFRecord shard per file in `directory`."""
    kind, shards, counts = _wanted_kind(spec), {}, {}
    for split, paths in splits.items():
        shards[split] = []
        for i, path in enumerate(paths):
            out = f"{split}-{i:05d}-of-{len(paths):05d}.tfrecord"
            writer = None if spec.format == "text" else tf.io.TFRecordWriter(f"{directory}/{out}")
            count = 0
            # The first row fixes the kind (supervised or text) for every later file and row.
            for row_kind, row in rows(spec, path, kind):
                kind, count = row_kind, count + 1
                if writer is not None:
                    writer.write(_example(row))
            if writer is not None:
                writer.close()
            if count == 0:
                raise DataError(f"{path} is empty: every {split} file needs at least one record")
            counts[path] = count
            # Text files are read where they are; a converted file from the cache directory.
            shards[split].append(_absolute(path) if writer is None else out)
    return {"kind": kind, "shards": shards, "records": counts}


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _fingerprint(spec: FileSpec, splits: dict) -> str:
    # The objective counts only as the kind of row it needs: span corruption and LM share a cache.
    head = f"v{CACHE_VERSION}:{spec.format}:{_wanted_kind(spec)}:{spec.fields}"
    h = hashlib.sha256(head.encode())
    for split, paths in splits.items():
        for path in paths:
            stat = tf.io.gfile.stat(path)
            h.update(f"{split}\0{_absolute(path)}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Checked files in the cache: what kind of rows, and the files seqio reads per split."""

    directory: str
    kind: str
    files: dict[str, list[str]]
    records: dict[str, int]


def prepare(spec: FileSpec) -> Prepared:
    """Check (and for JSONL / TSV convert) the spec's files, once per version of the files."""
    splits = {"train": _glob(spec, "train", spec.train)}
    if spec.validation:
        splits["validation"] = _glob(spec, "validation", spec.validation)
    final = os.path.join(corpus_lib.cache_root(), "files", _fingerprint(spec, splits))
    meta_path = os.path.join(final, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(final))
        try:
            meta = _check_and_convert(spec, splits, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta["spec"] = spec.spec
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        corpus_lib._publish(tmp, final)  # noqa: SLF001 - the corpus cache's atomic publish
    with open(meta_path) as f:
        meta = json.load(f)
    files = {
        s: [p if p == _absolute(p) else os.path.join(final, p) for p in ps]
        for s, ps in meta["shards"].items()
    }
    return Prepared(final, meta["kind"], files, meta["records"])


# --- the vocabulary ------------------------------------------------------------------------


def _trained_vocab(spec: FileSpec, prepared: Prepared) -> str:
    """A SentencePiece model trained on the training rows (inputs and targets, or text)."""
    model = os.path.join(
        prepared.directory, f"vocab_{spec.vocab_size}.{NUM_SENTINELS}extra", "sentencepiece.model"
    )
    if os.path.exists(model):
        return model
    text = os.path.join(prepared.directory, "vocab_input.txt")
    if not os.path.exists(text):
        every = (
            row
            for path in _glob(spec, "train", spec.train)
            for _, row in rows(spec, path, prepared.kind)
        )
        with tempfile.NamedTemporaryFile("w", dir=prepared.directory, delete=False) as f:
            for row in itertools.islice(every, MAX_VOCAB_SENTENCES):
                f.writelines(" ".join(value.split()) + "\n" for value in row.values())
        os.replace(f.name, text)
    print(
        f"training a {spec.vocab_size}-piece SentencePiece vocabulary on {spec.train} "
        f"(first use; cached in {prepared.directory})",
        file=sys.stderr,
        flush=True,
    )
    source = corpus_lib.Corpus(prepared.directory, (text,), "", "", {})
    try:
        return corpus_lib.build_vocab(source, spec.vocab_size, NUM_SENTINELS)
    except RuntimeError as e:
        # SentencePiece says how many pieces the text supports, or how many characters it has.
        most = re.search(r"value <= (\d+)", str(e))
        least = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
        if not most and not least:
            raise
        fix = f"at most {int(most[1])}" if most else f"at least {int(least[1])}"
        raise _bad(
            spec.spec,
            f"{spec.train} supports no {spec.vocab_size}-piece vocabulary; set vocab_size= to "
            f"{fix} + {NUM_SENTINELS} sentinels (and VOCAB_SIZE to match)",
        ) from None


def vocabulary_path(spec: FileSpec, prepared: Prepared, vocabulary: str | None = None) -> str:
    """The SentencePiece model the task uses: vocab=, else VOCABULARY, else the embedded one."""
    if spec.vocab and vocabulary and spec.vocab != vocabulary:
        raise _bad(spec.spec, f"vocab={spec.vocab} contradicts VOCABULARY={vocabulary!r}; keep one")
    choice = spec.vocab or vocabulary or "embedded"
    if choice == "embedded":
        return corpus_lib.build_embedded()[1]
    if choice == "t5":
        return T5_VOCAB
    if choice == "trained":
        return _trained_vocab(spec, prepared)
    return choice


# --- the seqio task ------------------------------------------------------------------------


def _source(prepared: Prepared, spec: FileSpec) -> seqio.DataSource:
    if spec.format == "text":
        return seqio.TextLineDataSource(prepared.files)
    roles = ("inputs", "targets") if prepared.kind == "supervised" else ("text",)
    description = {r: tf.io.FixedLenFeature([], tf.string) for r in roles}
    return seqio.TFExampleDataSource(prepared.files, description)


def register(spec_text: str, vocabulary: str | None = None) -> str:
    """Register (or reuse) the task a file spec names; returns its seqio task name.

    Args:
      spec_text: 'jsonl:...', 'tsv:...' or 'text:...' (see the module docstring).
      vocabulary: the run's VOCABULARY, used when the spec has no vocab=.
    """
    from switch_jax.data import tasks  # noqa: PLC0415 - tasks imports this module lazily

    spec = parse(spec_text)
    prepared = prepare(spec)
    objective = spec.objective or (
        "supervised" if prepared.kind == "supervised" else "span_corruption"
    )
    if objective == "supervised" and prepared.kind != "supervised":
        raise _bad(spec_text, "objective=supervised needs rows with inputs and targets")
    vocab_path = vocabulary_path(spec, prepared, vocabulary)
    key = (prepared.directory, registry.vocab_key(vocab_path), objective)
    name = spec.task_name
    _REGISTERED[spec_text] = name
    if registry.is_current(name, key, seqio.TaskRegistry):
        return name
    vocab = load_vocabulary(vocab_path)
    source = _source(prepared, spec)
    if objective != "supervised":
        text_key = None if spec.format == "text" else "text"
        return tasks._add_task(name, key, source, objective, vocab, text_key)  # noqa: SLF001
    return registry.add_task(
        name,
        key,
        source=source,
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
        postprocess_fn=task_metrics.stripped_text,
        metric_fns=[task_metrics.exact_match],
    )


def registered_name(spec_text: str) -> str | None:
    """The task name a spec registered in this process, if it is still in seqio."""
    name = _REGISTERED.get(spec_text)
    return name if name in seqio.TaskRegistry.names() else None
