"""seqio tasks: C4 span corruption and LM, the mC4 mixture, local text files, embedded corpus;
the registry of built-in names (GLUE / SuperGLUE: glue.py, the docstring task: docstrings.py)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

from switch_jax.data import corpus as corpus_lib
from switch_jax.data import docstrings, glue, registry
from switch_jax.data import files as files_lib
from switch_jax.data import span_corruption as sc
from switch_jax.data.errors import DataError, path_exists
from switch_jax.data.vocab import MT5_VOCAB, T5_VOCAB, load_vocabulary

C4_TFDS = "c4/en:3.0.1"
MC4_TFDS = "c4/multilingual:3.0.1"
MC4_SAMPLING_ALPHA = 0.3  # mT5: p(language) proportional to examples ** 0.3
# The 101 languages of mC4 3.0.1 that mT5 trains on ("und", undetermined, left out).
MC4_LANGUAGES = tuple(
    "af am ar az be bg bg-Latn bn ca ceb co cs cy da de el el-Latn en eo es et eu fa fi fil fr "
    "fy ga gd gl gu ha haw hi hi-Latn hmn ht hu hy id ig is it iw ja ja-Latn jv ka kk km kn ko "
    "ku ky la lb lo lt lv mg mi mk ml mn mr ms mt my ne nl no ny pa pl ps pt ro ru ru-Latn sd si "
    "sk sl sm sn so sq sr st su sv sw ta te tg th tr uk ur uz vi xh yi yo zh zh-Latn zu".split()
)
SPAN_CORRUPTION_LENGTHS = {"inputs": 512, "targets": 114}


def _features(vocab: seqio.Vocabulary, objective: str) -> dict[str, seqio.Feature]:
    if objective == "lm":
        # lm_chunks puts EOS after every document itself; rows are cut to exact length.
        return {"targets": seqio.Feature(vocab, add_eos=False)}
    return {"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab)}


def _lines_to_targets(dataset):
    """TextLineDataSource yields bare strings: make them {'targets': line}, dropping blank lines."""
    dataset = dataset.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
    return dataset.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def _preprocessors(text_key: str | None, objective: str) -> list[Callable]:
    if text_key is None:
        steps = [_lines_to_targets]
    else:
        steps = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key})]
    steps.append(functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False))
    if objective == "lm":
        return [*steps, sc.lm_chunks]
    if objective != "span_corruption":
        raise DataError(f"objective must be 'span_corruption' or 'lm', got {objective!r}")
    return [*steps, sc.span_corruption, seqio.preprocessors.append_eos_after_trim]


def _add_task(
    name, key, source, objective, vocab, text_key="text", shuffle_buffer_size=None
) -> str:
    if registry.is_current(name, key, seqio.TaskRegistry):
        return name
    return registry.add_task(
        name,
        key,
        source=source,
        preprocessors=_preprocessors(text_key, objective),
        output_features=_features(vocab, objective),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size or seqio.SHUFFLE_BUFFER_SIZE,
    )


def _check_tfds(tfds_name: str, data_dir: str, config: str) -> None:
    name, version = tfds_name.split(":")
    info = os.path.join(data_dir, name, version, "dataset_info.json")
    if not path_exists(info):
        raise DataError(
            f"TFDS {tfds_name} not found in {data_dir} (no {info}); prepare it with "
            f"`tfds build c4 --config {config} --data_dir DIR` (or copy a prepared "
            f"{name}/{version} there) and pass --tfds_data_dir=DIR"
        )


def register_c4(
    tfds_data_dir: str | None = None, vocabulary: str | seqio.Vocabulary = T5_VOCAB
) -> tuple[str, str]:
    """Register `c4_v301_span_corruption` and `c4_v301_lm` over TFDS c4/en:3.0.1.

    Args:
      tfds_data_dir: TFDS data directory (gs:// or local); default $TFDS_DATA_DIR or
        ~/tensorflow_datasets. Checked now, with a clear error when the data is missing.
      vocabulary: SentencePiece model path or seqio vocabulary; default T5's C4 vocabulary.
    """
    data_dir = registry.tfds_dir(tfds_data_dir)
    key = (data_dir, registry.vocab_key(vocabulary))
    names = ("c4_v301_span_corruption", "c4_v301_lm")
    if all(registry.key_of(n) == key for n in names):
        return names
    _check_tfds(C4_TFDS, data_dir, "en")
    vocab = load_vocabulary(vocabulary)
    for name, objective in zip(names, ("span_corruption", "lm"), strict=True):
        source = seqio.TfdsDataSource(C4_TFDS, tfds_data_dir=data_dir)
        _add_task(name, key, source, objective, vocab)
    return names


def register_mc4(
    tfds_data_dir: str | None = None,
    vocabulary: str | seqio.Vocabulary = MT5_VOCAB,
    languages: Sequence[str] = MC4_LANGUAGES,
) -> str:
    """Register the `mc4_span_corruption` mixture: one task per language, rates n ** 0.3.

    Args:
      tfds_data_dir: TFDS data directory holding c4/multilingual:3.0.1.
      vocabulary: default mT5's 250k SentencePiece model.
      languages: mC4 language codes to mix.
    """
    data_dir = registry.tfds_dir(tfds_data_dir)
    key = (data_dir, registry.vocab_key(vocabulary), tuple(languages))
    name = "mc4_span_corruption"
    if registry.is_current(name, key, seqio.MixtureRegistry):
        return name
    _check_tfds(MC4_TFDS, data_dir, "multilingual")
    vocab = load_vocabulary(vocabulary)
    tasks = []
    for lang in languages:
        splits = {"train": lang, "validation": f"{lang}-validation"}
        source = seqio.TfdsDataSource(MC4_TFDS, tfds_data_dir=data_dir, splits=splits)
        tasks.append(_add_task(f"{name}.{lang}", key, source, "span_corruption", vocab))
    rate = functools.partial(seqio.mixing_rate_num_examples, temperature=1 / MC4_SAMPLING_ALPHA)
    return registry.add_mixture(name, key, tasks, default_rate=rate)


def register_text_files(
    name: str,
    train_glob: str | Sequence[str],
    vocabulary: str | seqio.Vocabulary,
    validation_glob: str | Sequence[str] | None = None,
    objective: str = "span_corruption",
    shuffle_buffer_size: int | None = None,
) -> str:
    """Register a task over local text files, one document per line.

    Args:
      name: task name to register (re-registering replaces it).
      train_glob: glob(s) of training text files.
      vocabulary: SentencePiece model path or seqio vocabulary.
      validation_glob: optional glob(s) for the 'validation' split.
      objective: 'span_corruption' (encoder-decoder) or 'lm' (decoder-only).
      shuffle_buffer_size: examples in the shuffle buffer (seqio's default 1000 when None).
    """
    splits = {"train": train_glob}
    if validation_glob is not None:
        splits["validation"] = validation_glob
    for split, pattern in splits.items():
        if not seqio.utils.list_files(pattern):
            raise DataError(f"no files match {pattern!r} for the '{split}' split of task {name}")
    vocab = load_vocabulary(vocabulary)
    key = (repr(splits), registry.vocab_key(vocabulary), objective, shuffle_buffer_size)
    source = seqio.TextLineDataSource(splits)
    return _add_task(name, key, source, objective, vocab, None, shuffle_buffer_size)


def register_embedded(
    vocab_size: int = corpus_lib.DEFAULT_VOCAB_SIZE,
    max_bytes: int = corpus_lib.DEFAULT_MAX_BYTES,
    corpus_dir: str | None = None,
) -> tuple[str, str]:
    """Register `embedded_span_corruption` and `embedded_lm` (corpus + vocab built at first use).

    Args:
      vocab_size: ids of the embedded SentencePiece vocabulary, sentinels included.
      max_bytes: cap on the corpus text.
      corpus_dir: reuse this earlier build instead of the one matching the installed files.
    """
    corpus, model = corpus_lib.build_embedded(vocab_size, max_bytes, corpus_dir)
    names = ("embedded_span_corruption", "embedded_lm")
    for name, objective in zip(names, ("span_corruption", "lm"), strict=True):
        register_text_files(
            name, list(corpus.train_files), model, corpus.validation_file, objective=objective
        )
    return names


# Name -> its register function; nothing registers until get_provider asks for a name.
_BUILTIN = {
    "c4_v301_span_corruption": register_c4,
    "c4_v301_lm": register_c4,
    "mc4_span_corruption": register_mc4,
    "embedded_span_corruption": register_embedded,
    "embedded_lm": register_embedded,
    **glue.BUILTIN,
    **docstrings.BUILTIN,
}


def get_provider(name: str, **options) -> seqio.DatasetProviderBase:
    """The task or mixture `name`, registering a built-in one on first use.

    Args:
      name: a built-in name (see `builtin_names()`) or any task/mixture already registered.
      name: also files, 'jsonl:data/train-*.jsonl,validation=...' (data/files.py).
      **options: passed to the built-in's register function (e.g. tfds_data_dir, vocabulary,
        vocab_size); without them an existing registration is reused, else the defaults are
        registered. They must be empty for names registered elsewhere. `module` (T5X's
        MIXTURE_OR_TASK_MODULE) is imported first, so that it can register `name`.
    """
    module = options.pop("module", None)
    if module:
        import_task_module(module)
    if files_lib.is_spec(name):
        registered = files_lib.registered_name(name)
        if options or registered is None:
            registered = files_lib.register(name, **options)
        return seqio.get_mixture_or_task(registered)
    registered = name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()
    if name in _BUILTIN and (options or not registered):
        accepted = inspect.signature(_BUILTIN[name]).parameters
        unknown = sorted(set(options) - set(accepted))
        if unknown:  # e.g. VOCABULARY for an embedded task, which builds its own vocabulary
            raise DataError(f"options {unknown} do not apply to the built-in task {name!r}")
        _BUILTIN[name](**options)
    elif options:
        raise DataError(f"options {sorted(options)} only apply to built-in tasks, not {name!r}")
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(set(builtin_names()) | set(seqio.TaskRegistry.names()))
        raise DataError(
            f"unknown task or mixture {name!r}; {registry.near_names(name, known)} "
            "Or name your files, e.g. 'jsonl:data/train.jsonl' (docs/data.md), or import your "
            "seqio tasks with MIXTURE_OR_TASK_MODULE"
        ) from None


def import_task_module(module: str) -> None:
    """Import T5X's MIXTURE_OR_TASK_MODULE: a dotted module name, or a path to a .py file."""
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise DataError(f"MIXTURE_OR_TASK_MODULE={module!r}: no such file")
        name, path = os.path.splitext(os.path.basename(module))[0], os.path.abspath(module)
        if getattr(sys.modules.get(name), "__file__", None) == path:
            return  # importing twice would register its tasks twice, which seqio refuses
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not f"{module}.".startswith(f"{e.name}."):
            raise  # the module exists but itself imports something missing: keep the traceback
        raise DataError(
            f"MIXTURE_OR_TASK_MODULE={module!r}: no module named {e.name!r} on the Python path; "
            "add its folder to PYTHONPATH, or give the path of its .py file"
        ) from None


def builtin_names() -> tuple[str, ...]:
    """Names `get_provider` can register on demand."""
    return tuple(_BUILTIN)
