"""What evaluation and inference ask of a seqio task: its target vocabulary, its metric tasks,
and its postprocessed metric scores (seqio stays inside switch_jax.data)."""

from __future__ import annotations

from collections.abc import Sequence

import seqio

from switch_jax.data import tasks


def target_vocabulary(task_name: str):
    """The seqio vocabulary of the task's (or mixture's) 'targets' feature."""
    return tasks.get_provider(task_name).output_features["targets"].vocabulary


def metric_tasks(mixture_or_task: str, split: str = "validation", **task_options) -> list[str]:
    """The tasks of `mixture_or_task` that have metric functions and the split."""
    provider = tasks.get_provider(mixture_or_task, **task_options)
    members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return [t.name for t in members if t.predict_metric_fns and split in t.splits]


def score(task_name: str, examples: Sequence[dict], targets: Sequence, predictions: Sequence):
    """The task's metric functions on its postprocessed targets and predictions."""
    task = seqio.get_mixture_or_task(task_name)
    post = task.postprocess_fn or (lambda text, example=None, is_target=False: text)
    targets = [post(t, example=ex, is_target=True) for t, ex in zip(targets, examples, strict=True)]
    preds = [
        post(p, example=ex, is_target=False) for p, ex in zip(predictions, examples, strict=True)
    ]
    results = {}
    for fn in task.predict_metric_fns:
        results.update({k: float(v) for k, v in fn(targets, preds).items()})
    return results
