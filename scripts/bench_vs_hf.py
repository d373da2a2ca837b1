"""Side by side with HF transformers' SwitchTransformers (PyTorch), back to back on one machine.

    pip install torch==2.13.0 'transformers>=5'        # beside switch_jax, for this script only
    python scripts/bench_vs_hf.py --part=train          # ~15 min on 2 cores
    python scripts/bench_vs_hf.py --part=decode         # ~5 min
    -> one JSON line per measurement; docs/benchmarks.md §8 has the figures

train: the issue-24 encoder-decoder (d_model 512, d_ff 2048, 8 heads x 64, 6+6 layers, vocab
  32128, 8 experts in layers 1/3/5 of each stack, capacity factor 1.25 = HF's 80 slots per
  512-token sequence, dropout 0.1, jitter 0.01, batch 8 x 512/114), a train step with Adafactor
  (torch.optim.Adafactor there, optax's here), the Switch model and its dense twin (HF's T5).
  HF runs in float32 in this process; ours runs `python -m switch_jax.bench` per --dtypes and
  --dispatches in a subprocess right after. tokens/s = batch x (512 + 114) / median step time.
  HF's fraction of dropped tokens (per sparse layer, mean) is printed beside.
decode: one HF Switch model with random weights (seeded) saved with save_pretrained, imported
  with switch_jax.convert; the same --batch x --input_length token ids decoded --decode_length
  tokens both ways (EOS off on both), greedy and --beams, float32, HF's per-sequence capacity
  on both (formats.hf_config.hf_routing). Greedy tokens are compared; beam search differs by
  design (our brevity penalty is T5X's), so only its speed is.
Both sides run under one malloc: the script restarts under TCMalloc as switch-bench does
(parallel/host_malloc.py); SWITCH_JAX_MALLOC=system keeps the system's for both. Every row
names its process's malloc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6)
VOCAB, EXPERTS, BATCH, INPUTS, TARGETS = 32128, 8, 8, 512, 114


def _hf_configs(capacity: int, dropout: float):
    from transformers import SwitchTransformersConfig, T5Config  # noqa: PLC0415

    switch = SwitchTransformersConfig(
        vocab_size=VOCAB,
        num_experts=EXPERTS,
        num_sparse_encoder_layers=3,
        num_sparse_decoder_layers=3,
        expert_capacity=capacity,
        router_jitter_noise=0.01,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0,
        dropout_rate=dropout,
        decoder_start_token_id=0,
        **SHAPE,
    )
    dense = T5Config(
        vocab_size=VOCAB,
        dropout_rate=dropout,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        **SHAPE,
    )
    return switch, dense


def _capacity(sequence_length: int) -> int:
    """HF's fixed per-sequence expert capacity: ours for one group of that sequence."""
    from switch_jax.models.routing import expert_capacity  # noqa: PLC0415

    return expert_capacity(sequence_length, EXPERTS, 1.25, min_capacity=0)


def _print(row: dict) -> None:
    """One JSON line, led by the malloc it was measured under: this process's, unless the row
    names another (ours, measured in a subprocess)."""
    from switch_jax.parallel import host_malloc  # noqa: PLC0415

    print(json.dumps({"malloc": host_malloc.describe()} | row), flush=True)


# ----------------------------------------------------------------------------------- train


def _drop_counter(model):
    """Hooks on every HF router: the fraction of tokens its capacity dropped, per call."""
    fractions: list[float] = []

    def hook(module, inputs, output):
        expert_index = output[0]  # one-hot, all zero where the token was dropped
        fractions.append(float((expert_index.sum(-1) == 0).float().mean()))

    for module in model.modules():
        if type(module).__name__ == "SwitchTransformersTop1Router":
            module.register_forward_hook(hook)
    return fractions


def train_hf(steps: int, threads: int) -> None:
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        SwitchTransformersForConditionalGeneration,
        T5ForConditionalGeneration,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    switch_cfg, dense_cfg = _hf_configs(_capacity(INPUTS), 0.1)
    models = {
        "switch": SwitchTransformersForConditionalGeneration(switch_cfg),
        "dense": T5ForConditionalGeneration(dense_cfg),
    }
    drops = _drop_counter(models["switch"])
    rng = np.random.default_rng(0)
    inputs = torch.tensor(rng.integers(2, VOCAB, (BATCH, INPUTS)))
    labels = torch.tensor(rng.integers(2, VOCAB, (BATCH, TARGETS)))
    runs = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
        extra = {"output_router_logits": True} if name == "switch" else {}

        def step(model=model, opt=opt, extra=extra):
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=inputs, labels=labels, **extra)
            out.loss.backward()
            opt.step()
            return float(out.loss)

        runs[name] = step
    times = {name: [] for name in runs}
    for i in range(steps + 1):  # interleaved; the first step of each is a warm-up
        for name, step in runs.items():
            started = time.perf_counter()
            step()
            if i:
                times[name].append(time.perf_counter() - started)
    tokens = BATCH * (INPUTS + TARGETS)
    for name, ts in times.items():
        row = {"framework": "hf", "torch": torch.__version__, "model": name, "dtype": "float32"}
        row |= {"step_s": round(statistics.median(ts), 3), "steps": len(ts)}
        row["tokens_per_s"] = round(tokens / statistics.median(ts), 1)
        if name == "switch":
            row["fraction_dropped"] = round(statistics.mean(drops), 4)
        _print(row)
    ratio = [s / d for s, d in zip(times["switch"], times["dense"], strict=True)]
    _print({"framework": "hf", "switch_over_dense_step": round(statistics.median(ratio), 3)})


def _bench_gin(dtype: str, router_stddev: float) -> list[str]:
    return [
        f"--gin.BATCH_SIZE={BATCH}",
        f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {INPUTS}, 'targets': {TARGETS}}}",
        f"--gin.ModelConfig.dtype='{dtype}'",
        f"--gin.MoeConfig.router_init_stddev={router_stddev}",
    ]


def our_fraction_dropped(router_stddev: float) -> float:
    """Mean over the sparse layers of the fraction of tokens over capacity in one training
    forward pass at initialisation, on the batch switch-bench times (HF's hooks measure the
    same on theirs)."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from switch_jax.config import gin_config  # noqa: PLC0415
    from switch_jax.models.transformer import Transformer  # noqa: PLC0415
    from switch_jax.tools.benchmarks.step import synthetic_batch  # noqa: PLC0415

    bindings = [b.removeprefix("--gin.") for b in _bench_gin("float32", router_stddev)]
    gin_config.parse_gin(["models/switch_cpu_bench.gin"], bindings)
    cfg = gin_config.load_configs().model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = synthetic_batch(cfg, BATCH, (INPUTS, TARGETS))  # the batch switch-bench times
    _, stats = nnx.jit(lambda m, b: m(b, train=True))(model, batch)
    dropped = [np.asarray(jax.device_get(s.fraction_dropped)) for s in stats.values() if s]
    return float(np.mean(np.concatenate(dropped)))


def train_ours(steps: int, dtypes: list[str], dispatches: list[str], router_stddev: float):
    dropped = our_fraction_dropped(router_stddev)
    for dtype in dtypes:
        cmd = [
            sys.executable,
            "-m",
            "switch_jax.bench",
            "--gin_file=models/switch_cpu_bench.gin",
            *_bench_gin(dtype, router_stddev),
            "--variants=dispatches",
            f"--dispatches={','.join(dispatches)}",
            f"--steps={steps}",
            "--warmup=1",
            "--json",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        for name, r in result["dispatches"].items():
            for model in ("switch", "dense"):
                s = r[model]
                row = {"malloc": result["host_malloc"], "framework": "switch_jax"}
                row |= {"model": model, "dtype": dtype}
                row |= {"dispatch": name if model == "switch" else None}
                if model == "switch":
                    row |= {"router_init_stddev": router_stddev, "fraction_dropped": dropped}
                row |= {"step_s": round(s["step_s"], 3), "compile_s": round(s["compile_s"], 1)}
                row["tokens_per_s"] = round(s["tokens_per_s"], 1)
                _print(row)
            _print(
                {
                    "framework": "switch_jax",
                    "dtype": dtype,
                    "dispatch": name,
                    "switch_over_dense_step": round(r["over_dense_wall"]["paired_median"], 3),
                }
            )


# ---------------------------------------------------------------------------------- decode


def decode(
    batch: int,
    input_length: int,
    decode_length: int,
    beams: list[int],
    threads: int,
    dispatches: list[str],
):
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import SwitchTransformersForConditionalGeneration  # noqa: PLC0415

    from switch_jax.config.settings import DecodeConfig  # noqa: PLC0415
    from switch_jax.decode import decoding  # noqa: PLC0415
    from switch_jax.formats import convert, hf_config  # noqa: PLC0415
    from switch_jax.parallel import partitioning  # noqa: PLC0415
    from switch_jax.store import checkpoints  # noqa: PLC0415
    from switch_jax.tools.benchmarks.dispatch import moe_variant  # noqa: PLC0415
    from switch_jax.training import steps  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    capacity = _capacity(input_length)
    switch_cfg, _ = _hf_configs(capacity, 0.0)
    hf = SwitchTransformersForConditionalGeneration(switch_cfg).eval()
    hf.generation_config.eos_token_id = None  # decode every row to decode_length
    hf.generation_config.decoder_start_token_id = 0  # T5's (and ours): the pad id
    ids = np.random.default_rng(1).integers(2, VOCAB, (batch, input_length))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(os.path.join(tmp, "hf"))
        cfg = convert.import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "model"))
        cfg = hf_config.hf_routing(cfg.replace(dtype="float32"), input_length, capacity)
        partitioner = partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1])
        abstract = steps.abstract_params(partitioner.adapt_model_config(cfg, batch), partitioner)
        params = checkpoints.restore_params(os.path.join(tmp, "model"), abstract.params)

    def ours(n, dispatch):
        model_cfg = cfg.replace(moe=moe_variant(cfg.moe, dispatch))
        model_cfg = partitioner.adapt_model_config(model_cfg, batch)
        dec_cfg = DecodeConfig(decode_length, beam_size=n, routing="capacity", eos_id=-1)
        dec = decoding.make_decoder(model_cfg, partitioner, dec_cfg)
        feed = {"encoder_input_tokens": ids.astype(np.int32)}
        return lambda: np.asarray(jax.device_get(dec.generate(params, feed))["tokens"])

    def theirs(n):
        inputs = torch.tensor(ids)

        def run():
            with torch.no_grad():
                out = hf.generate(
                    input_ids=inputs,
                    max_new_tokens=decode_length,
                    num_beams=n,
                    do_sample=False,
                )
            return out[:, 1:].numpy()  # drop the decoder start token

        return run

    calls = {}
    for n in beams:
        calls[("hf", n)] = theirs(n)
        calls |= {(f"ours {d}", n): ours(n, d) for d in dispatches}
    outputs = {key: call() for key, call in calls.items()}  # warm-up (and our compile)
    times = {key: [] for key in calls}
    for _ in range(3):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    for (fw, n), ts in times.items():
        seconds = statistics.median(ts)
        row = {"framework": fw, "beams": n, "batch": batch, "input_length": input_length}
        row |= {"decode_length": decode_length, "seconds": round(seconds, 3)}
        row["tokens_per_s"] = round(batch * decode_length / seconds, 1)
        _print(row)
    for d in dispatches if 1 in beams else ():
        a, b = outputs[("hf", 1)], outputs[(f"ours {d}", 1)]
        b = b[:, : a.shape[1]]
        row = {"dispatch": d, "greedy_tokens_equal": float((a == b).mean())}
        _print(row | {"rows_equal": int((a == b).all(1).sum())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "decode"), required=True)
    parser.add_argument("--steps", type=int, default=4, help="timed train steps per model")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="ours: activation dtypes")
    parser.add_argument("--dispatches", default="sorted:fused,scatter", help="ours: dispatches")
    parser.add_argument(
        "--router_init_stddev",
        type=float,
        default=0.02,
        help="ours: the router's init (HF initialises its router with stddev 1.0)",
    )
    parser.add_argument("--skip_hf", action="store_true", help="train: ours only")
    parser.add_argument("--batch", type=int, default=8, help="decode: sequences")
    parser.add_argument("--input_length", type=int, default=512, help="decode: encoder tokens")
    parser.add_argument("--decode_length", type=int, default=32, help="decode: tokens per row")
    parser.add_argument("--beams", default="1,4", help="decode: beam sizes (1 = greedy)")
    args = parser.parse_args()
    from switch_jax.parallel import host_malloc  # noqa: PLC0415

    host_malloc.restart_under_tcmalloc(commands=None)  # HF under the malloc ours gets
    if args.part == "train":
        if not args.skip_hf:
            train_hf(args.steps, args.threads)
        dtypes, dispatches = args.dtypes.split(","), args.dispatches.split(",")
        train_ours(args.steps, dtypes, dispatches, args.router_init_stddev)
    else:
        beams = [int(b) for b in args.beams.split(",")]
        dispatches = args.dispatches.split(",")
        decode(args.batch, args.input_length, args.decode_length, beams, args.threads, dispatches)


if __name__ == "__main__":
    main()
