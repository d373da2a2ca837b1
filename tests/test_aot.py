"""switch_jax.tools.aot without compiling: TPU slice names, HLO collectives, HBM figures."""

from __future__ import annotations

import sys

import pytest

from switch_jax.models.config import ConfigError
from switch_jax.parallel import hlo
from switch_jax.tools import aot

# Cloud TPU's accelerator types and their torus shapes (as in MaxText's accelerator table).
SLICES = {
    "v4-8": ("v4:2x2x1", 4, (2, 2, 1)),
    "v4-64": ("v4:2x4x4", 32, (2, 2, 1)),
    "v4-128": ("v4:4x4x4", 64, (2, 2, 1)),
    "v4-4096": ("v4:8x16x16", 2048, (2, 2, 1)),
    "v5p-8": ("v5:2x2x1", 4, (2, 2, 1)),
    "v5p-16": ("v5:2x2x2", 8, (2, 2, 1)),
    "v5p-64": ("v5:2x4x4", 32, (2, 2, 1)),
    "v5p-2048": ("v5:8x8x16", 1024, (2, 2, 1)),
    "v5e-1": ("v5e:1x1", 1, (1, 1, 1)),
    "v5e-4": ("v5e:2x2", 4, (2, 2, 1)),
    "v5litepod-16": ("v5e:4x4", 16, (2, 2, 1)),
    "v5e-128": ("v5e:8x16", 128, (2, 2, 1)),
    "v5e-256": ("v5e:16x16", 256, (2, 2, 1)),
    "v6e-8": ("v6e:2x4", 8, (2, 4, 1)),
    "v6e-256": ("v6e:16x16", 256, (2, 2, 1)),
}


@pytest.mark.parametrize("name", list(SLICES))
def test_accelerator_types(name):
    topology_name, chips, bounds = SLICES[name]
    topo = aot.parse_topology(name)
    assert (topo.topology_name, topo.chips, topo.chips_per_host_bounds) == SLICES[name]
    megacore = name.startswith(("v4-", "v5p-"))  # two TensorCores per chip, one JAX device
    assert topo.spec.chip_config == ("megacore" if megacore else "default")


@pytest.mark.parametrize("name", ["v3-8", "v5p-24", "v4-7", "tpu-64", "v5e-2"])
def test_unknown_accelerator_types_are_one_line_errors(name):
    with pytest.raises(ConfigError, match="--topology="):
        aot.parse_topology(name)


# A hand-written optimised-HLO excerpt: a sync all-to-all, an async all-gather pair, a tuple
# all-reduce; a loop of 2 (known_trip_count, an all-reduce) around a loop of 6 (a reduce-scatter;
# its bound only in the condition, as the TPU compiler writes scans).
HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%body.1 (p: (s32[], f32[64,128], /*index=2*/f32[2])) -> (s32[], f32[64,128], f32[2]) {
  %rs = f32[16,128]{1,0:T(8,128)} reduce-scatter(%x), channel_id=4, dimensions={0}
  ROOT %t = (s32[], f32[64,128]) tuple(%i, %y)
}

%cond.1 (p: (s32[], f32[64,128])) -> pred[] {
  %constant.1740.clone.3 = s32[]{:T(128)} constant(6)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.588 = pred[]{:T(512)} compare(%gte, %constant.1740.clone.3), direction=LT
}

%outer.3 (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %w2 = (s32[], f32[64,128]) while(%init), condition=%cond.1, body=%body.1
  %ar2 = f32[8]{0} all-reduce(%q), channel_id=9
  ROOT %t = (s32[], f32[64,128]) tuple(%i, %y)
}

ENTRY %main.2 (a: bf16[4,8,20,128]) -> f32[8] {
  %all-to-all = bf16[1,4,2,20,128]{4,2,3,0,1:T(2,128)(2,1)S(1)} all-to-all(%copy), channel_id=1
  %ag-start = (bf16[64,256]{1,0}, bf16[512,256]{1,0}) all-gather-start(%convert), channel_id=2
  %ag-done = bf16[512,256]{1,0:T(8,128)(2,1)} all-gather-done(%ag-start)
  %all-reduce.67 = (f32[]{:T(128)}, f32[8192,128]{1,0:T(8,128)S(1)}) all-reduce(%g, %h)
  %w = (s32[], f32[64,128]) while(%init), condition=%cond.0, body=%outer.3, \
backend_config={"known_trip_count":{"n":"2"}}
  ROOT %r = f32[8]{0} copy(%z)
}
"""


def test_collectives_count_done_ops_and_loop_trips():
    c = hlo.collectives(HLO)
    assert c["all-to-all"] == {"count": 1, "bytes": 1 * 4 * 2 * 20 * 128 * 2}
    assert c["all-gather"] == {"count": 1, "bytes": 512 * 256 * 2}  # the -done result only
    assert c["all-reduce"] == {"count": 1 + 2, "bytes": 4 + 8192 * 128 * 4 + 2 * 8 * 4}
    assert c["reduce-scatter"] == {"count": 12, "bytes": 12 * 16 * 128 * 4}
    assert c["collective-permute"] == {"count": 0, "bytes": 0}
    assert c["loop_trips"] == [2, 6]


# Verbatim from libtpu 0.0.42.1 (jax.errors.JaxRuntimeError of a v5p-16 compile here).
RESOURCE_EXHAUSTED = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (234.38G) exceeds available HBM (95.74G)."
)


def test_not_fit_message_is_one_line_with_the_shortfall():
    err = aot._not_fit(RuntimeError(RESOURCE_EXHAUSTED), "v5p-16 with MESH_SHAPE=(1, 8, 1)")
    assert isinstance(err, aot.DoesNotFitError)
    text = str(err)
    assert "\n" not in text
    assert text.startswith("does not fit v5p-16 with MESH_SHAPE=(1, 8, 1): HLO temporaries")
    assert "234.38G" in text and "95.74G" in text and "MICROBATCHES" in text
    other = RuntimeError("INTERNAL: something else")
    assert aot._not_fit(other, "x") is other


def test_state_check_names_the_shortfall():
    class Plan:  # just the bytes check_state_fits reads
        class memory:
            state_bytes_per_device = 20 * aot.GiB

    with pytest.raises(aot.DoesNotFitError) as e:
        aot.check_state_fits(Plan, aot.GiB, int(15.75 * aot.GiB), "v5e-1")
    assert "21.00 GiB per chip, 5.25 GiB more than its 15.75 GiB" in str(e.value)
    assert "PARTITION_RULES=fsdp" in str(e.value)
    aot.check_state_fits(Plan, 0, 21 * aot.GiB, "v5p-8")  # fits: no error


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now raises ImportError
    with pytest.raises(ConfigError, match=r"needs libtpu: pip install 'switch_jax\[tpu\]'"):
        aot.topology_devices(aot.parse_topology("v5e-4"))
