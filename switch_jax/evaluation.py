"""Decode a task's examples and score them with the task's own metrics (seqio metric functions).

    examples = task_examples("glue_cola_v002", "validation", {"inputs": 128, "targets": 8}, 500)
    predictions, speed = predict(decoder, params, examples, batch_size=32)
    metrics = task_metrics("glue_cola_v002", examples, predictions)  # {'matthews_corrcoef': ..}
    results, samples = evaluate(decoder, params, "glue_v002_proportional", ...)  # per sub-task

Every host reads the same examples and feeds the whole batch (validation sets are small); the
decoder shards it over the mesh. TensorFlow / seqio are imported only inside the functions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from switch_jax.decoding import Decoder

EOS_ID = 1


def task_examples(
    task_name: str,
    split: str,
    feature_lengths: Mapping[str, int],
    max_examples: int | None = None,
    **task_options,
) -> list[dict]:
    """The first `max_examples` examples of a task's split, unshuffled, as NumPy dicts (token ids
    in 'inputs' / 'targets', text in '*_pretokenized', plus the task's other fields)."""
    from switch_jax.data import DataError, tasks  # noqa: PLC0415

    provider = tasks.get_provider(task_name, **task_options)
    if split not in provider.splits:
        raise DataError(f"{task_name} has no split {split!r}; it has {list(provider.splits)}")
    dataset = provider.get_dataset(
        sequence_length=dict(feature_lengths), split=split, shuffle=False, num_epochs=1
    )
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    return list(dataset.as_numpy_iterator())


def _pad(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = np.asarray(row, np.int32)[:length]
        out[i, : len(row)] = row
    return out


def generation_batch(decoder: Decoder, inputs: Sequence[np.ndarray], length: int) -> dict:
    """Token-id inputs -> the batch `Decoder.generate` takes (encoder inputs or a prompt)."""
    key = (
        "encoder_input_tokens" if decoder.model_cfg.is_encoder_decoder else "decoder_prompt_tokens"
    )
    return {key: _pad(inputs, length)}


def to_global(partitioner, host_batch: dict) -> dict:
    """Full host batch (the same on every host) -> global arrays sharded over the batch axes."""
    sharding = partitioner.batch_sharding
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in host_batch.items()
    }


def to_host(tree):
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return multihost_utils.process_allgather(tree, tiled=True)


def strip_eos(tokens: np.ndarray, length: int) -> list[int]:
    ids = [int(t) for t in tokens[:length]]
    return ids[:-1] if ids and ids[-1] == EOS_ID else ids


def predict(
    decoder: Decoder,
    params,
    examples: Sequence[dict],
    *,
    batch_size: int,
    input_length: int,
    rng_seed: int = 0,
) -> tuple[list[dict], dict]:
    """Decode every example: ([{'tokens': [...], 'log_prob': float}, ...], speed stats).

    The last batch is padded with empty rows so that one compiled program serves all batches.
    """
    outputs, generated, started = [], 0, time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = [ex["inputs"] for ex in examples[start : start + batch_size]]
        real = len(chunk)
        chunk += [np.zeros((0,), np.int32)] * (batch_size - real)
        batch = to_global(decoder.partitioner, generation_batch(decoder, chunk, input_length))
        out = to_host(decoder.generate(params, batch, jax.random.PRNGKey(rng_seed + start)))
        for i in range(real):
            length = int(out["length"][i])
            outputs.append(
                {
                    "tokens": strip_eos(out["tokens"][i], length),
                    "log_prob": float(out["log_prob"][i]),
                }
            )
            generated += length
    seconds = time.perf_counter() - started
    return outputs, {"examples": len(outputs), "tokens": generated, "seconds": seconds}


def task_metrics(task_name: str, examples: Sequence[dict], predictions: Sequence[str]) -> dict:
    """The task's metric functions on postprocessed predictions and targets."""
    import seqio  # noqa: PLC0415

    task = seqio.get_mixture_or_task(task_name)
    post = task.postprocess_fn or (lambda text, example=None, is_target=False: text)
    targets = [
        post(_text(ex["targets_pretokenized"]), example=ex, is_target=True) for ex in examples
    ]
    preds = [
        post(p, example=ex, is_target=False) for p, ex in zip(predictions, examples, strict=True)
    ]
    results = {}
    for fn in task.predict_metric_fns:
        results.update({k: float(v) for k, v in fn(targets, preds).items()})
    return results


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def evaluate(
    decoder: Decoder,
    params,
    mixture_or_task: str,
    *,
    split: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    max_examples: int | None,
    **task_options,
) -> tuple[dict, list[dict]]:
    """Metrics of every task with metric functions in `mixture_or_task` ('{task}/{metric}' keys,
    plus 'decode/tokens_per_second'), and a few decoded samples for the console."""
    import seqio  # noqa: PLC0415

    from switch_jax.data import tasks  # noqa: PLC0415

    provider = tasks.get_provider(mixture_or_task, **task_options)
    members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    results, samples, tokens, seconds = {}, [], 0, 0.0
    for task in members:
        if not task.predict_metric_fns or split not in task.splits:
            continue
        examples = task_examples(task.name, split, feature_lengths, max_examples)
        outputs, speed = predict(
            decoder,
            params,
            examples,
            batch_size=batch_size,
            input_length=feature_lengths["inputs"],
        )
        vocab = task.output_features["targets"].vocabulary
        texts = [vocab.decode(o["tokens"]) for o in outputs]
        for name, value in task_metrics(task.name, examples, texts).items():
            results[f"{task.name}/{name}"] = value
        tokens, seconds = tokens + speed["tokens"], seconds + speed["seconds"]
        for ex, text in list(zip(examples, texts, strict=True))[:3]:
            samples.append(
                {
                    "task": task.name,
                    "inputs": _text(ex["inputs_pretokenized"]),
                    "targets": _text(ex["targets_pretokenized"]),
                    "prediction": text,
                }
            )
    if seconds:
        results["decode/tokens_per_second"] = tokens / seconds
    return results, samples
