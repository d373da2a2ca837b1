"""Decode a task's examples and score them with the task's own metrics (seqio metric functions).

    examples = task_examples("glue_cola_v002", "validation", {"inputs": 128, "targets": 8}, 500)
    predictions, speed = predict(decoder, params, examples, batch_size=32)
    metrics = task_metrics("glue_cola_v002", examples, predictions)  # {'matthews_corrcoef': ..}
    TaskEvaluator(run)(params, step) -> {'glue_cola_v002/matthews_corrcoef': ..., ...}

Every host reads the same examples and feeds the whole batch (validation sets are small); the
decoder shards it over the mesh. seqio is reached only through switch_jax.data (task_info).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from switch_jax.decode.decoding import Decoder

EOS_ID = 1


def data_options(data) -> dict:
    """The task options a DataConfig sets (as run_builder passes them to the pipeline)."""
    options = {"tfds_data_dir": data.tfds_data_dir} if data.tfds_data_dir else {}
    if data.vocabulary:
        options["vocabulary"] = data.vocabulary
    if data.mixture_or_task_module:
        options["module"] = data.mixture_or_task_module
    return options


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


def score_batch(decoder: Decoder, inputs, targets, lengths: Mapping[str, int]) -> dict:
    """Token-id inputs and targets -> the teacher-forced batch `Decoder.score` takes. A
    decoder-only model scores the targets as the continuation of the inputs."""
    T = lengths["targets"]
    if decoder.model_cfg.is_encoder_decoder:
        out = {
            "encoder_input_tokens": _pad(inputs, lengths["inputs"]),
            "decoder_target_tokens": _pad(targets, T),
        }
        weights = out["decoder_target_tokens"] > 0
    else:
        P = lengths.get("inputs", 0)
        pairs = list(zip(inputs, targets, strict=True))
        rows = [np.concatenate([np.asarray(i, np.int32)[:P], np.asarray(t)[:T]]) for i, t in pairs]
        out = {"decoder_target_tokens": _pad(rows, P + T)}
        weights = np.zeros_like(out["decoder_target_tokens"], bool)
        for b, (i, t) in enumerate(pairs):
            start = min(len(i), P)
            weights[b, start : start + min(len(t), T)] = True
    targets_BT = out["decoder_target_tokens"]
    out["decoder_input_tokens"] = np.pad(targets_BT[:, :-1], ((0, 0), (1, 0)))
    out["decoder_loss_weights"] = weights.astype(np.int32)
    return out


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

    The last batch is padded with empty rows so that one compiled program serves all batches;
    under the default dropless routing they change no real row's prediction.
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


def example_text(example: dict, key: str, vocab):
    """The raw text of an example's feature (seqio keeps it as '<key>_pretokenized' when the
    task tokenizes), else its decoded token ids."""
    raw = example.get(f"{key}_pretokenized")
    if raw is not None:
        return _text(raw)
    ids = [int(t) for t in np.asarray(example[key]) if t != 0]
    return vocab.decode(ids[:-1] if ids and ids[-1] == EOS_ID else ids)


def task_metrics(task_name: str, examples: Sequence[dict], predictions: Sequence) -> dict:
    """The task's metric functions on postprocessed predictions and targets."""
    from switch_jax.data import task_info  # noqa: PLC0415

    vocab = task_info.target_vocabulary(task_name)
    targets = [example_text(ex, "targets", vocab) for ex in examples]
    return task_info.score(task_name, examples, targets, predictions)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def metric_tasks(mixture_or_task: str, split: str = "validation", **task_options) -> list[str]:
    """The tasks of `mixture_or_task` that have metric functions and the split."""
    from switch_jax.data import task_info  # noqa: PLC0415

    return task_info.metric_tasks(mixture_or_task, split, **task_options)


class TaskEvaluator:
    """Decode-and-score evaluation of a run's task or mixture on its validation split.

    Built once per run: the decoder compiles at the first call, the examples are read once.
    Returns {} when no task of the run has metric functions (e.g. span corruption) or
    EVAL_DECODE_EXAMPLES=0.
    """

    def __init__(self, run, split: str = "validation"):
        self.run, self.split = run, split
        self._decoder = None
        self._examples: dict[str, list[dict]] | None = None

    def _setup(self) -> None:
        data, decode = self.run.configs.data, self.run.configs.decode
        lengths = data.feature_lengths
        options = data_options(data)
        self._examples = {}
        if decode.eval_examples == 0:
            return
        for name in metric_tasks(data.mixture_or_task_name, self.split, **options):
            self._examples[name] = task_examples(name, self.split, lengths, decode.eval_examples)
        if self._examples:
            from switch_jax.decode.decoding import make_decoder  # noqa: PLC0415

            cfg = decode.for_length(lengths["targets"])
            self._decoder = make_decoder(self.run.model_cfg, self.run.partitioner, cfg)

    def __call__(self, params, step: int | None = None) -> dict:
        from switch_jax.data import task_info  # noqa: PLC0415

        if self._examples is None:
            self._setup()
        lengths = self.run.configs.data.feature_lengths
        results, tokens, seconds = {}, 0, 0.0
        self.samples = []
        for name, examples in self._examples.items():
            outputs, speed = predict(
                self._decoder,
                params,
                examples,
                batch_size=self.run.configs.data.batch_size,
                input_length=lengths.get("inputs", lengths["targets"]),
            )
            vocab = task_info.target_vocabulary(name)
            texts = [vocab.decode(o["tokens"]) for o in outputs]
            for metric, value in task_metrics(name, examples, texts).items():
                results[f"{name}/{metric}"] = value
            tokens, seconds = tokens + speed["tokens"], seconds + speed["seconds"]
            self.samples += [
                {
                    "task": name,
                    "inputs": example_text(ex, "inputs", vocab),
                    "targets": example_text(ex, "targets", vocab),
                    "prediction": text,
                }
                for ex, text in list(zip(examples, texts, strict=True))[:3]
            ]
        if seconds:
            results["decode/tokens_per_second"] = tokens / seconds
        if results and jax.process_index() == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in results.items())
            print(f"eval  step {step}: {shown}", flush=True)
            for sample in self.samples[:3]:
                print(f"  {str(sample['inputs'])[:70]!r} -> {sample['prediction']!r} "
                      f"(target {sample['targets']!r})", flush=True)  # fmt: skip
        return results
