"""Decoding speed: greedy vs beam search, dropless vs capacity routing (tokens/s), interleaved.

    python scripts/bench_decode.py --gin_file=models/tiny.gin --batch=32 --input_length=128 \
      --decode_length=32 --beams=1,4 --routings=dropless,capacity --repeats=3
    -> one JSON line per setting: seconds per call (median of repeats, compile excluded) and
       output tokens/s = batch x decode_length / seconds (EOS is disabled, so every row decodes
       exactly decode_length tokens; beam search computes beams x as many).

Random weights (a fresh train state's: the speed does not depend on them), the mesh of
MESH_SHAPE (default: all devices on 'data'), the Run and decoder as switch_jax.infer builds them.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from switch_jax.config import gin_config
from switch_jax.config.settings import DecodeConfig
from switch_jax.decode import decoding
from switch_jax.training import build, losses

gin_config.define_flags()
_BATCH = flags.DEFINE_integer("batch", 32, "sequences per call")
_INPUT = flags.DEFINE_integer("input_length", 128, "encoder tokens per sequence")
_DECODE = flags.DEFINE_integer("decode_length", 32, "tokens decoded per sequence")
_BEAMS = flags.DEFINE_list("beams", ["1", "4"], "beam sizes (1 = greedy)")
_ROUTINGS = flags.DEFINE_list("routings", ["dropless", "capacity"], "DecodeConfig.routing values")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per setting (after one warm-up)")


def main(argv):
    del argv
    f = flags.FLAGS
    gin_config.parse_gin(f.gin_file or ["models/tiny.gin"], f.gin_bindings, f.gin_search_paths)
    run = build.build_run(gin_config.load_configs(), objective=losses.LABELS)
    partitioner, model_cfg = run.partitioner, run.model_cfg
    params = run.setup.init_state().params
    rng = np.random.default_rng(0)
    key = "encoder_input_tokens" if model_cfg.is_encoder_decoder else "decoder_prompt_tokens"
    batch = {key: rng.integers(2, model_cfg.vocab_size, (_BATCH.value, _INPUT.value), np.int32)}
    decoders = {
        (routing, int(n)): decoding.make_decoder(
            model_cfg,
            partitioner,
            DecodeConfig(_DECODE.value, beam_size=int(n), routing=routing, eos_id=-1),
        )
        for routing in _ROUTINGS.value
        for n in _BEAMS.value
    }
    for dec in decoders.values():  # compile
        jax.block_until_ready(dec.generate(params, batch))
    times: dict[tuple[str, int], list[float]] = {setting: [] for setting in decoders}
    for _ in range(_REPEATS.value):  # interleaved: a shared machine slows all settings alike
        for setting, dec in decoders.items():
            started = time.perf_counter()
            jax.block_until_ready(dec.generate(params, batch))
            times[setting].append(time.perf_counter() - started)
    tokens = _BATCH.value * _DECODE.value
    for (routing, n), ts in times.items():
        seconds = statistics.median(ts)
        row = {
            "routing": routing,
            "beam_size": n,
            "batch": _BATCH.value,
            "input_length": _INPUT.value,
            "decode_length": _DECODE.value,
            "seconds": round(seconds, 4),
            "tokens_per_second": round(tokens / seconds, 1),
            "devices": len(jax.devices()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=gin_config.flags_parser)
