"""An offline supervised task: which standard-library package does this docstring come from?

`docstring_package`: inputs "package: <first prose paragraph of a docstring>", targets the
top-level package ("asyncio", "email", ...), scored by exact match. The examples come from the
interpreter's own standard library (the same text the embedded corpus is made of), so a
fine-tuning demo needs no network. Deterministic: the split of an example depends only on its
text (a repeated text is kept once); at most PER_PACKAGE docstrings per package keep the classes
roughly balanced (chance = 1 / len(PACKAGES), about 11%).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sysconfig
import zlib

import seqio
import tensorflow as tf

from switch_jax.data import corpus as corpus_lib
from switch_jax.data import registry, task_metrics
from switch_jax.data.errors import DataError
from switch_jax.data.vocab import load_vocabulary

TASK = "docstring_package"
PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "tkinter",
    "unittest",
    "xml",
)
PER_PACKAGE = 200
MAX_CHARS = 400
VALIDATION_EVERY = 8  # one text in 8 goes to validation
_KINDS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _package_texts(root: str, package: str) -> list[str]:
    """First prose paragraph of each of the package's docstrings, in a fixed order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "__pycache__"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                doc = ast.get_docstring(node) if isinstance(node, _KINDS) else None
                paragraphs = corpus_lib._clean(doc) if doc else []
                if paragraphs:
                    out.append(paragraphs[0][:MAX_CHARS])
    return out[:PER_PACKAGE]


def examples(split: str, stdlib: str | None = None) -> tuple[tuple[str, str], ...]:
    """((inputs, targets), ...) of a split ('train' or 'validation')."""
    return _splits(stdlib or sysconfig.get_paths()["stdlib"])[split]


@functools.cache
def _splits(root: str) -> dict[str, tuple]:
    # A text that recurs (copied docstrings of overriding methods) is kept once, with the
    # package where it appears first, so validation texts are never seen in training.
    seen, rows = set(), {"train": [], "validation": []}
    for package in PACKAGES:
        for text in _package_texts(root, package):
            if text in seen:
                continue
            seen.add(text)
            held_out = zlib.crc32(text.encode()) % VALIDATION_EVERY == 0
            rows["validation" if held_out else "train"].append((f"package: {text}", package))
    if not rows["validation"]:
        raise DataError(f"no docstrings found for {TASK} under {root}")
    return {k: tuple(v) for k, v in rows.items()}


def _dataset(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples
    inputs, targets = zip(*examples(split), strict=True)
    return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})


def register(vocabulary=None) -> str:
    """Register `docstring_package` with the embedded corpus vocabulary (or `vocabulary`)."""
    if vocabulary is None:
        vocabulary = corpus_lib.build_embedded()[1]
    key = registry.vocab_key(vocabulary)
    if registry.is_current(TASK, key, seqio.TaskRegistry):
        return TASK
    vocab = load_vocabulary(vocabulary)
    return registry.add_task(
        TASK,
        key,
        source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
        postprocess_fn=task_metrics.stripped_text,
        metric_fns=[task_metrics.exact_match],
    )


BUILTIN = {TASK: register}


def write_jsonl(directory: str) -> dict[str, str]:
    """Write the task's splits as {directory}/{split}.jsonl ('inputs', 'targets' a line), the
    files `runs/finetune_jsonl_demo.gin` reads; returns split -> path."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split in ("train", "validation"):
        paths[split] = os.path.join(directory, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            for inputs, targets in examples(split):
                f.write(json.dumps({"inputs": inputs, "targets": targets}) + "\n")
    return paths


if __name__ == "__main__":  # python -m switch_jax.data.docstrings data/docstring_package
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m switch_jax.data.docstrings OUTPUT_DIR")
    for split, path in write_jsonl(sys.argv[1]).items():
        print(f"{split}: {len(examples(split))} examples in {path}")
