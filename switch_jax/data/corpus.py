"""The embedded default corpus: English docstrings of installed Python packages, and its vocab."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

from switch_jax.data.errors import DataError

# Bump when the extraction rules change, so stale caches are not reused.
EXTRACT_VERSION = 1
DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_VOCAB_SIZE = 8192
NUM_TRAIN_SHARDS = 8
VALIDATION_EVERY = 50  # one document in 50 goes to validation
MAX_LINE_BYTES = 4000  # below SentencePiece's 4192-byte max_sentence_length
MAX_SOURCE_BYTES = 1_000_000  # bigger .py files are generated tables, not prose
_STOPWORDS = frozenset(
    "the of and to a in is it that for this be with as on are an by or if not from at which "
    "can will should when all its use used returns return value given default these no".split()
)
_WORD = re.compile(r"[A-Za-z]+")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |#|[{}\[\]()]|def |class |import |from \S+ import)")


def cache_root() -> str:
    """Cache directory for corpora and vocabularies: $SWITCH_JAX_CACHE or ~/.cache/switch_jax."""
    return os.environ.get("SWITCH_JAX_CACHE") or os.path.expanduser("~/.cache/switch_jax")


def default_roots() -> list[str]:
    """The standard library of this interpreter, without site-packages.

    Installed packages are left out on purpose: `pip install` of anything would otherwise
    change the corpus and its vocabulary under a run that is being resumed. The standard
    library depends only on the Python version, so every machine with that version builds the
    same bytes.
    """
    return [os.path.realpath(sysconfig.get_paths()["stdlib"])]


_PACKAGE_DIRS = ("site-packages", "dist-packages")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A built corpus on disk: one document per line, UTF-8."""

    directory: str
    train_files: tuple[str, ...]
    validation_file: str
    content_hash: str
    stats: dict


def _list_sources(roots: Sequence[str]) -> list[tuple[str, str, int, int]]:
    """(key, path, size, mtime_ns) of every .py file, in a fixed, package-mixing order."""
    roots = sorted({os.path.realpath(r) for r in roots})
    found = []
    for index, root in enumerate(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            # Nested roots are walked once, as their own root; installed packages never.
            dirnames[:] = sorted(
                d
                for d in dirnames
                if os.path.realpath(os.path.join(dirpath, d)) not in roots
                and d not in _PACKAGE_DIRS
            )
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = -1, 0  # dangling link: counted as unreadable later
                key = os.path.relpath(path, root)
                found.append(
                    (hashlib.sha1(key.encode()).hexdigest(), index, key, path, size, mtime)
                )
    # Ordering by a hash of the relative path mixes packages, so a byte cap samples all of them
    # instead of the alphabetically first few.
    found.sort()
    found = [(f"{index}:{key}", path, size, mtime) for _, index, key, path, size, mtime in found]
    return found


def _is_prose(paragraph: str) -> bool:
    words = _WORD.findall(paragraph)
    if len(words) < 6:
        return False
    text_chars = sum(c.isascii() and (c.isalpha() or c in " ,.;:'-()\"") for c in paragraph)
    if text_chars < 0.9 * len(paragraph):
        return False
    stop = sum(w.lower() in _STOPWORDS for w in words)
    return stop >= 0.12 * len(words)


def _clean(docstring: str) -> list[str]:
    """Prose paragraphs of a docstring, whitespace collapsed, each at most MAX_LINE_BYTES."""
    out = []
    for para in re.split(r"\n\s*\n", docstring):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or any(_CODE_LINE.match(ln) for ln in lines):
            continue
        text = " ".join(" ".join(lines).split())
        if _is_prose(text):
            out.append(text)
    return out


def _chunks(paragraphs: Iterable[str]) -> list[str]:
    """Group a docstring's paragraphs into documents that fit one SentencePiece sentence."""
    docs, current = [], ""
    for para in paragraphs:
        while len(para.encode()) > MAX_LINE_BYTES:  # rare giant paragraph: cut at a space
            cut = para.rfind(" ", 0, MAX_LINE_BYTES // 2) if " " in para else -1
            cut = cut if cut > 0 else MAX_LINE_BYTES // 2
            docs.append(para[:cut])
            para = para[cut:].strip()
        if current and len((current + " " + para).encode()) > MAX_LINE_BYTES:
            docs.append(current)
            current = para
        else:
            current = f"{current} {para}" if current else para
    if current:
        docs.append(current)
    return docs


def _docstrings(path: str) -> tuple[str, list[str]]:
    """(outcome, documents) of one source file; outcome names why a file gave nothing."""
    try:
        with open(path, "rb") as f:
            source = f.read(MAX_SOURCE_BYTES + 1)
    except OSError:
        return "unreadable", []
    if len(source) > MAX_SOURCE_BYTES:
        return "too_large", []
    try:
        source.decode("utf-8")
        tree = ast.parse(source)
    except UnicodeDecodeError:
        return "not_utf8", []
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "unparsable", []  # e.g. Python 2 files, templates
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.extend(_chunks(_clean(doc)))
    return "parsed", out


def _extract_all(paths: Sequence[str], workers: int):
    """Yield `_docstrings` of each path in order, parsing on `workers` processes."""
    if workers <= 1 or len(paths) < 256:
        yield from map(_docstrings, paths)
        return
    # spawn, not fork: the caller may already run TensorFlow threads, which fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_docstrings, paths, chunksize=32)
        pool.terminate()


def _fingerprint(sources, max_bytes: int) -> str:
    h = hashlib.sha256(f"v{EXTRACT_VERSION}:{max_bytes}".encode())
    for key, _, size, mtime in sources:
        h.update(f"{key}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _hash_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _write_corpus(directory: str, sources, max_bytes: int, workers: int) -> dict:
    counts = dict(files=0, parsed=0, unreadable=0, not_utf8=0, unparsable=0, too_large=0)
    seen, total = set(), 0
    shards = [open(os.path.join(directory, _train_name(i)), "w") for i in range(NUM_TRAIN_SHARDS)]
    val = open(os.path.join(directory, "validation.txt"), "w")
    docs = {"train": 0, "validation": 0}
    try:
        results = _extract_all([s[1] for s in sources], workers)
        for outcome, file_docs in results:
            if total >= max_bytes:
                results.close()
                break
            counts["files"] += 1
            counts[outcome] += 1
            for doc in file_docs:
                digest = hashlib.sha1(doc.encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                total += len(doc.encode()) + 1
                # Splits and shards follow the text's hash: stable however the files are ordered.
                if digest[0] % VALIDATION_EVERY == 0:
                    val.write(doc + "\n")
                    docs["validation"] += 1
                else:
                    shards[digest[1] % NUM_TRAIN_SHARDS].write(doc + "\n")
                    docs["train"] += 1
    finally:
        for f in [*shards, val]:
            f.close()
    return dict(counts, bytes=total, documents=docs)


def _train_name(i: int) -> str:
    return f"train-{i:05d}-of-{NUM_TRAIN_SHARDS:05d}.txt"


def _publish(tmp: str, final: str) -> None:
    """Move a finished build into place; another process that got there first wins."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final):
            raise


def build_corpus(
    roots: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    cache_dir: str | None = None,
    rebuild: bool = False,
    workers: int | None = None,
    on_build: Callable[[], None] | None = None,
) -> Corpus:
    """Extract (or reuse from cache) the docstring corpus and return where it lies.

    Files are visited in a fixed order, parsed with `ast` (never imported), and prose paragraphs
    of English docstrings are kept, deduplicated, until `max_bytes` of text; unreadable,
    non-UTF-8 and unparsable files are skipped and counted in `stats`.

    Args:
      roots: directories to scan; default the standard library of this interpreter.
      max_bytes: cap on the corpus text (the default builds in well under a minute on 2 cores).
      cache_dir: where corpora are cached; default `cache_root()/embedded`.
      rebuild: ignore an existing cached build.
      workers: parsing processes (default: the CPU count); the result does not depend on it.
      on_build: called before extracting, when there is no cached build to reuse.
    """
    roots = list(roots) if roots is not None else default_roots()
    cache_dir = cache_dir or os.path.join(cache_root(), "embedded")
    sources = _list_sources(roots)
    final = os.path.join(cache_dir, f"corpus-{_fingerprint(sources, max_bytes)}")
    if rebuild or not os.path.exists(os.path.join(final, "meta.json")):
        if on_build is not None:
            on_build()
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
        stats = _write_corpus(tmp, sources, max_bytes, workers or os.cpu_count() or 1)
        if stats["documents"]["train"] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(
                f"embedded corpus is empty: no English docstrings in {len(sources)} .py files "
                f"under {roots} (skipped: {stats}); pass other roots or use a text-file task"
            )
        files = ["validation.txt"] + [_train_name(i) for i in range(NUM_TRAIN_SHARDS)]
        stats["content_hash"] = _hash_files([os.path.join(tmp, f) for f in files])
        stats["roots"] = roots
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
        if rebuild and os.path.isdir(final):
            shutil.rmtree(final, ignore_errors=True)
        _publish(tmp, final)
    return load_corpus(final)


def load_corpus(directory: str) -> Corpus:
    """A corpus built earlier by `build_corpus`, from its directory (pins it across installs)."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise DataError(f"{directory} is not a built corpus (no meta.json)")
    with open(meta_path) as f:
        stats = json.load(f)
    return Corpus(
        directory=directory,
        train_files=tuple(os.path.join(directory, _train_name(i)) for i in range(NUM_TRAIN_SHARDS)),
        validation_file=os.path.join(directory, "validation.txt"),
        content_hash=stats["content_hash"],
        stats=stats,
    )


def _add_sentinels(model_path: str, num_sentinels: int) -> None:
    """Append <extra_id_N> pieces so that <extra_id_0> is the last id, as in T5's models."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    # The trainer spec records paths and thread count; drop them so the bytes depend only on
    # the corpus (and the vocabulary's hash is comparable across cache directories).
    for field in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(field)
    for i in reversed(range(num_sentinels)):
        piece = proto.pieces.add()
        piece.piece = f"<extra_id_{i}>"
        piece.score = 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))


def build_vocab(
    corpus: Corpus,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_sentinels: int = 100,
    on_build: Callable[[], None] | None = None,
) -> str:
    """Train (or reuse) a SentencePiece model on the corpus; returns its path.

    T5 ids: pad 0, eos 1, unk 2, no bos; the `num_sentinels` sentinels are the last ids
    (<extra_id_0> = vocab_size - 1), inside the file, so it loads with extra_ids=0.

    Args:
      corpus: from `build_corpus`; the vocabulary is cached next to it.
      vocab_size: total ids including the sentinels.
      num_sentinels: sentinel pieces to append.
      on_build: called before training, when there is no cached model to reuse.
    """
    import sentencepiece as spm

    if vocab_size <= num_sentinels + 3:
        raise DataError(f"vocab_size {vocab_size} leaves no room beside {num_sentinels} sentinels")
    final = os.path.join(corpus.directory, f"vocab_{vocab_size}.{num_sentinels}extra")
    model = os.path.join(final, "sentencepiece.model")
    if os.path.exists(model):
        return model
    if on_build is not None:
        on_build()
    tmp = tempfile.mkdtemp(prefix=".vocab-", dir=corpus.directory)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(corpus.train_files),
            model_prefix=os.path.join(tmp, "sentencepiece"),
            model_type="unigram",
            vocab_size=vocab_size - num_sentinels,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=0.9995,
            # Use every line, unshuffled, so the model depends only on the corpus bytes.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 14,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a text too small for vocab_size
        raise
    _add_sentinels(os.path.join(tmp, "sentencepiece.model"), num_sentinels)
    os.remove(os.path.join(tmp, "sentencepiece.vocab"))
    _publish(tmp, final)
    return model


def build_embedded(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    corpus_dir: str | None = None,
) -> tuple[Corpus, str]:
    """The default embedded corpus and its vocabulary path, built at first use and cached.

    The cache key follows the standard-library files, so a Python upgrade builds a new corpus
    and vocabulary; pass `corpus_dir` (or set $SWITCH_JAX_EMBEDDED_CORPUS) to keep using one build.

    Args:
      vocab_size: ids of the vocabulary, sentinels included.
      max_bytes: cap on the corpus text.
      corpus_dir: a directory made by an earlier build, used as is.
    """
    corpus_dir = corpus_dir or os.environ.get("SWITCH_JAX_EMBEDDED_CORPUS")
    notice = _FirstUse(corpus_dir or cache_root())
    if corpus_dir:
        corpus = load_corpus(corpus_dir)
    else:
        corpus = build_corpus(max_bytes=max_bytes, on_build=notice.start)
    model = build_vocab(corpus, vocab_size, on_build=notice.start)
    notice.done()
    return corpus, model


class _FirstUse:
    """The first build takes tens of seconds with nothing else on screen: a line on stderr when
    it starts and one when it is done; nothing when the cache holds it all."""

    def __init__(self, where: str):
        home = os.path.expanduser("~") + os.sep
        self.where = "~/" + where[len(home) :] if where.startswith(home) else where
        self.started: float | None = None

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()
            what = f"the embedded corpus and vocabulary under {self.where}"
            _say(f"building {what} (first use, ~40 s)…")

    def done(self) -> None:
        if self.started is not None:
            _say(f"done in {time.perf_counter() - self.started:.0f} s")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
