"""Peak host memory of an HF import vs the size of the model (docs/checkpoints.md, streaming).

    JAX_PLATFORMS=cpu python scripts/convert_memory.py [--experts 64] [--layers 2] [--budget_mb 64]

Writes a synthetic HF Switch directory (random float32 weights, d_model 512, d_ff 2048, every
other layer sparse: the expert stacks dominate), converts it in a subprocess with the given write
budget and prints the subprocess's peak anonymous memory (sampled from /proc every 20 ms) and
peak RSS, next to the model's size. RSS also counts the file-backed pages of the memory-mapped
safetensors and scratch files, which the kernel can drop at any time; anonymous memory is what
the conversion really holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

D, F, H, K, V = 512, 2048, 8, 64, 1024


def write_model(directory: str, experts: int, layers: int) -> int:
    from safetensors.numpy import save_file

    from switch_jax.formats import hf_config, layout
    from switch_jax.models.config import ModelConfig, MoeConfig

    cfg = ModelConfig(
        vocab_size=V, d_model=D, d_ff=F, num_heads=H, head_dim=K, num_encoder_layers=layers,
        num_decoder_layers=layers, moe=MoeConfig(num_experts=experts, sparse_every=2),
    )  # fmt: skip
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    shards, total = [], 0
    for entry in layout.hf_entries(cfg, "switch"):
        shape = entry.shape[1:] if entry.stacked else entry.shape
        tensors = {}
        for name in entry.sources:
            ours = rng.standard_normal(shape, dtype=np.float32)
            tensors[name] = np.ascontiguousarray(entry.to_source(ours))
            total += tensors[name].nbytes
        shards.append(tensors)  # one file per entry: an index.json-sharded HF directory
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config.to_hf(cfg), f)
    return total


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def _peaks(work) -> dict:
    peak, done = [_anon_bytes()], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], _anon_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    work()
    done.set()
    thread.join()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"anon": max(peak[0], _anon_bytes()), "rss": rss}


def convert_child(source: str, target: str, budget: int) -> None:
    from switch_jax.formats import convert

    def work():
        convert.import_hf(source, target, budget_bytes=budget, disk_backed_bytes=budget)

    print(json.dumps(_peaks(work)))


def baseline_child() -> None:
    import orbax.checkpoint  # noqa: F401  (what the converter imports, doing nothing)

    from switch_jax.formats import convert  # noqa: F401

    print(json.dumps(_peaks(lambda: time.sleep(0.1))))


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget_mb", type=int, default=64)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()
    if args.child is not None:
        if args.child:
            convert_child(args.child[0], args.child[1], args.budget_mb << 20)
        else:
            baseline_child()
        return
    with tempfile.TemporaryDirectory() as tmp:
        size = write_model(os.path.join(tmp, "hf"), args.experts, args.layers)
        base = child("--child")
        peak = child("--budget_mb", str(args.budget_mb), "--child", f"{tmp}/hf", f"{tmp}/out")
    mib = 2**20
    tensor = args.experts * D * F * 4
    print(
        f"model {size / mib:,.0f} MiB ({args.layers}+{args.layers} layers, {args.experts} "
        f"experts, largest tensor {tensor / mib:,.0f} MiB); budget {args.budget_mb} MiB: peak "
        f"anonymous memory {(peak['anon'] - base['anon']) / mib:,.0f} MiB above the imports' "
        f"{base['anon'] / mib:,.0f} MiB; peak RSS {peak['rss'] / mib:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
