"""Task metrics as seqio metric functions `fn(targets, predictions) -> {name: value}` (T5's scale:
percentages), and the postprocessors that turn decoded text into what they compare.

Everything here is NumPy / SciPy on host values; no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

Metric = Callable[[Sequence, Sequence], dict]


# --- postprocessors: postprocess(text, example=None, is_target=False) ------------------------


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def class_label(label_names: Sequence[str]) -> Callable:
    """Label name -> its class index; anything else (an invalid prediction) -> -1."""
    index = {name: i for i, name in enumerate(label_names)}

    def postprocess(text, example=None, is_target=False):
        del example, is_target
        return index.get(_text(text).strip(), -1)

    return postprocess


def string_to_float(text, example=None, is_target=False, default: float = -1.0) -> float:
    """A number (STS-B's score); text that is not one gives `default`, scored as a bad guess."""
    del example, is_target
    try:
        return float(_text(text).strip())
    except ValueError:
        return default


def stripped_text(text, example=None, is_target=False) -> str:
    """The text without surrounding whitespace (exact-match tasks)."""
    del example, is_target
    return _text(text).strip()


def multirc(text, example=None, is_target=False) -> dict:
    """{'value': 0/1/-1} plus, for targets, the question the answer belongs to."""
    out = {"value": class_label(("False", "True"))(text)}
    if is_target:
        out["group"] = int(np.asarray(example["idx/question"]))
    return out


# --- metrics ---------------------------------------------------------------------------------


def accuracy(targets, predictions) -> dict:
    """{'accuracy': % of predictions equal to their target}."""
    t, p = np.asarray(targets), np.asarray(predictions)
    return {"accuracy": 100.0 * float(np.mean(t == p))}


def exact_match(targets, predictions) -> dict:
    """{'exact_match': %}; compares element by element, so texts and dicts work too."""
    same = [t == p for t, p in zip(targets, predictions, strict=True)]
    return {"exact_match": 100.0 * float(np.mean(same))}


def _binary_f1(t: np.ndarray, p: np.ndarray) -> float:
    tp = float(np.sum((p == 1) & (t == 1)))
    fp = float(np.sum((p == 1) & (t != 1)))
    fn = float(np.sum((p != 1) & (t == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_with_invalid(targets, predictions) -> dict:
    """Binary F1 of class 1; a prediction that is no label at all counts as wrong (T5)."""
    t, p = np.asarray(targets), np.asarray(predictions).copy()
    invalid = (p != 0) & (p != 1)
    p[invalid] = 1 - t[invalid]
    return {"f1": 100.0 * _binary_f1(t, p)}


def mean_multiclass_f1(num_classes: int) -> Metric:
    """Unweighted mean over classes of the one-vs-rest F1 (SuperGLUE CB)."""

    def metric(targets, predictions) -> dict:
        t, p = np.asarray(targets), np.asarray(predictions)
        f1s = [_binary_f1((t == c).astype(int), (p == c).astype(int)) for c in range(num_classes)]
        return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(f1s))}

    return metric


def matthews_corrcoef(targets, predictions) -> dict:
    """Multiclass Matthews correlation (Gorodkin's R_K); invalid predictions are one more class."""
    t, p = np.asarray(targets), np.asarray(predictions)
    labels = np.union1d(t, p)
    confusion = np.array([[np.sum((t == a) & (p == b)) for b in labels] for a in labels], float)
    s, c = confusion.sum(), np.trace(confusion)
    true_k, pred_k = confusion.sum(1), confusion.sum(0)
    denominator = np.sqrt((s**2 - pred_k @ pred_k) * (s**2 - true_k @ true_k))
    value = 0.0 if denominator == 0 else (c * s - pred_k @ true_k) / denominator
    return {"matthews_corrcoef": 100.0 * float(value)}


def pearson_corrcoef(targets, predictions) -> dict:
    """{'pearson_corrcoef': 100 x Pearson's r} (STS-B)."""
    return {"pearson_corrcoef": 100.0 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets, predictions) -> dict:
    """{'spearman_corrcoef': 100 x Spearman's rho} (STS-B)."""
    return {"spearman_corrcoef": 100.0 * float(scipy.stats.spearmanr(targets, predictions)[0])}


def multirc_f1_over_all_answers(targets, predictions) -> dict:
    """F1a: binary F1 over every (question, answer) pair."""
    t = np.array([x["value"] for x in targets])
    p = np.array([x["value"] for x in predictions])
    return {"f1a": 100.0 * _binary_f1(t, p)}


def multirc_exact_match(targets, predictions) -> dict:
    """EM: fraction of questions whose answers are all labelled right."""
    by_group: dict[int, bool] = {}
    for t, p in zip(targets, predictions, strict=True):
        by_group[t["group"]] = by_group.get(t["group"], True) and t["value"] == p["value"]
    return {"exact_match": 100.0 * float(np.mean(list(by_group.values())))}
