"""The batches of reproduce_scaling.py: its corpus, task per objective, and token counts."""

from __future__ import annotations

import os

import numpy as np

# The embedded corpus' task of each architecture: span corruption for T5's encoder-decoder, a
# plain LM (every token a target) for a decoder-only model.
EMBEDDED = {"encoder_decoder": "embedded_span_corruption", "decoder_only": "embedded_lm"}
# What the installed-docstrings corpus is registered as, per architecture.
INSTALLED = {"encoder_decoder": "scaling_span_corruption", "decoder_only": "scaling_lm"}
OBJECTIVE = {"encoder_decoder": "span_corruption", "decoder_only": "lm"}


def register_installed_corpus(args) -> dict:
    """A docstring corpus of the standard library and the installed packages, up to
    --corpus_bytes: ~6x the demo's 1.6 MB, so the runs see (almost) no text twice."""
    import site  # noqa: PLC0415

    from switch_jax.data import corpus as corpus_lib  # noqa: PLC0415
    from switch_jax.data import tasks  # noqa: PLC0415

    roots = corpus_lib.default_roots() + [p for p in site.getsitepackages() if os.path.isdir(p)]
    corpus = corpus_lib.build_corpus(roots, max_bytes=args.corpus_bytes)
    vocab = corpus_lib.build_vocab(corpus, args.vocab_size)
    args.task = tasks.register_text_files(
        INSTALLED[args.architecture],
        list(corpus.train_files),
        vocab,
        corpus.validation_file,
        objective=OBJECTIVE[args.architecture],
    )
    keep = ("bytes", "documents", "content_hash", "roots")
    return {k: v for k, v in corpus.stats.items() if k in keep}


def feature_lengths(args) -> dict[str, int]:
    if args.architecture == "decoder_only":
        return {"targets": args.targets_length}
    return {"inputs": args.inputs_length, "targets": args.targets_length}


def token_counts(batches: list[dict]) -> dict[str, int]:
    """Real (non-padding) tokens a run reads, and how many of them are loss targets."""
    weights = sum(int(np.sum(b["decoder_loss_weights"] > 0)) for b in batches)
    inputs = sum(
        int(np.sum(b["encoder_input_tokens"] > 0)) for b in batches if "encoder_input_tokens" in b
    )
    return {"tokens": inputs + weights, "target_tokens": weights}


def load_data(args) -> tuple[dict[int, list[dict]], list[dict]]:
    """Training batches per seed (data order = seed) and one fixed validation set."""
    from switch_jax.data import pipeline  # noqa: PLC0415 (TensorFlow)

    task = dict(feature_lengths=feature_lengths(args), architecture=args.architecture)
    embedded = args.task in (None, EMBEDDED[args.architecture])
    if embedded and args.corpus == "installed":
        args.corpus_stats = register_installed_corpus(args)
    elif embedded:
        args.task = EMBEDDED[args.architecture]
        task["vocab_size"] = args.vocab_size
    train = {}
    for seed in range(args.seeds):
        it = pipeline.make_batches(
            args.task, "train", seed=seed, batch_size=args.batch_size, **task
        )
        train[seed] = [next(it) for _ in range(args.steps)]
    args.tokens = {str(seed): token_counts(batches) for seed, batches in train.items()}
    val_ds = pipeline.make_dataset(
        args.task, "validation", shuffle=False, repeat=True, batch_size=args.eval_batch_size, **task
    )
    val = [{k: v.numpy() for k, v in b.items()} for b in val_ds.take(args.eval_batches)]
    return train, val
