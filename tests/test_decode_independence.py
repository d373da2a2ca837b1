"""A row's prediction and score do not depend on the other rows of its batch or on padding.

The probe input is decoded (greedy and beam) and scored alone, as the last of 16 rows, and as
the last real row of a batch padded with empty rows, on one device and on a data=2 x expert=2
mesh, with the default DecodeConfig. The model's eval capacity drops tokens when 16 are routed
together (1 slot per expert in a group of 4 on the mesh, 4 per expert in a group of 16 on one
device), so the old capacity routing fails this (test_capacity_routing_depends_on_the_batch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from switch_jax.decode import decoding, evaluation
from switch_jax.models.config import ConfigError
from switch_jax.parallel import partitioning
from tests.model_fixtures import make_model, tiny_config

MAX_LEN, BEAMS, S, T = 5, 3, 7, 5
ARCHITECTURES = ("encoder_decoder", "decoder_only")
SINGLE, MESH = (1, 1, 1), (2, 2, 1)


def config(architecture: str):
    """One sparse layer per stack, float32, an eval capacity that drops under a batch's load."""
    moe = dataclasses.replace(
        tiny_config().moe, capacity_factor_eval=1.0, min_capacity=1, sparse_every=1
    )
    return tiny_config(
        architecture=architecture,
        dtype="float32",
        num_encoder_layers=1,
        num_decoder_layers=1,
        moe=moe,
    )


@functools.cache
def params(architecture: str):
    return nnx.state(make_model(config(architecture), seed=3), nnx.Param)


def examples() -> tuple[list, list, list, list]:
    """(probe input, probe target, 15 other inputs, 15 other targets); ragged lengths."""
    rng = np.random.default_rng(0)
    draw = lambda n: [rng.integers(2, 64, rng.integers(2, n + 1)) for _ in range(16)]  # noqa: E731
    inputs, targets = draw(S), draw(T - 1)
    targets = [np.append(t, 1) for t in targets]  # EOS-terminated, as a task's targets are
    return inputs[0], targets[0], inputs[1:], targets[1:]


def contexts():
    """name -> (inputs, targets, row of the probe): alone, last of 16, last real row + padding."""
    x, y, xs, ys = examples()
    empty = np.zeros((0,), np.int32)
    return {
        "alone": ([x], [y], 0),
        "with 15 others": (xs + [x], ys + [y], 15),
        "last real row, padded": (xs[:5] + [x] + [empty] * 10, ys[:5] + [y] + [empty] * 10, 5),
    }


def make(architecture: str, mesh, **decode):
    devices = jax.devices()[: int(np.prod(mesh))]
    part = partitioning.Partitioner(mesh_shape=mesh, devices=devices)
    cfg = part.adapt_model_config(config(architecture))
    return decoding.make_decoder(cfg, part, decoding.DecodeConfig(MAX_LEN, **decode))


@functools.cache
def probe_results(architecture: str, mesh, capacity: bool = False, beams: bool = True) -> dict:
    """context -> {greedy tokens, greedy log_prob, beam tokens, beam scores, score} of the probe;
    with the default routing, or T5X's (`capacity`)."""
    routing = {"routing": "capacity"} if capacity else {}
    greedy = make(architecture, mesh, **routing)
    beam = make(architecture, mesh, **routing, beam_size=BEAMS) if beams else None
    p, out = params(architecture), {}
    for name, (inputs, targets, row) in contexts().items():
        if len(inputs) % greedy.partitioner.batch_shards:
            continue  # "alone" is one row: a mesh needs batch_shards rows (the padded case)
        gen = evaluation.generation_batch(greedy, inputs, S)
        g = jax.device_get(greedy.generate(p, gen))
        scored = evaluation.score_batch(greedy, inputs, targets, {"inputs": S, "targets": T})
        res = {"tokens": g["tokens"][row], "log_prob": g["log_prob"][row]}
        res["score"] = jax.device_get(greedy.score(p, scored))[row]
        if beam is not None:
            b = jax.device_get(beam.generate(p, gen))
            res.update(beam_tokens=b["beam_tokens"][row], beam_scores=b["beam_scores"][row])
        out[name] = res
    return out


@pytest.mark.parametrize("mesh", [SINGLE, MESH], ids=["one_device", "data2_expert2"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_row_decodes_and_scores_the_same_in_any_batch(architecture, mesh):
    want = probe_results(architecture, SINGLE)["alone"]
    got = probe_results(architecture, mesh)
    assert len(got) >= 2
    for name, res in got.items():
        np.testing.assert_array_equal(res["tokens"], want["tokens"], err_msg=name)
        np.testing.assert_array_equal(res["beam_tokens"], want["beam_tokens"], err_msg=name)
        for key in ("log_prob", "beam_scores", "score"):
            np.testing.assert_allclose(res[key], want[key], rtol=0, atol=1e-5, err_msg=name)
    # A real search: distinct beams, a finite score of the target.
    assert len({tuple(t) for t in want["beam_tokens"]}) == BEAMS and -1e3 < want["score"] < 0


def test_capacity_routing_depends_on_the_batch():
    # T5X's routing (each call's tokens over the batch, with capacity): the same probe changes
    # with its neighbours, which is what the test above would catch.
    got = probe_results("encoder_decoder", SINGLE, capacity=True, beams=False)
    for key in ("log_prob", "score"):
        values = [float(res[key]) for res in got.values()]
        assert max(values) - min(values) > 1e-2, (key, values)


def test_capacity_settings_need_capacity_routing():
    with pytest.raises(ConfigError, match="routing='capacity'"):
        decoding.DecodeConfig(capacity_factor=2.0)
    with pytest.raises(ConfigError, match="unset DecodeConfig.dispatch"):
        decoding.DecodeConfig(routing="capacity", dispatch="dropless")
    with pytest.raises(ConfigError, match="'dropless' or 'capacity'"):
        decoding.DecodeConfig(routing="none")
    cfg = decoding.DecodeConfig(routing="capacity", capacity_factor=2.0, dispatch="einsum")
    moe = decoding.decoding_model_config(config("decoder_only"), cfg).moe
    assert (moe.capacity_factor_eval, moe.dispatch) == (2.0, "einsum")
    moe = decoding.decoding_model_config(config("decoder_only"), decoding.DecodeConfig()).moe
    assert moe.dispatch == "dropless"
