"""switch_jax.tools.aot without compiling: TPU slice names, HLO collectives, HBM, the roofline."""

from __future__ import annotations

import sys

import pytest

from switch_jax.models.config import ConfigError
from switch_jax.parallel import hlo
from switch_jax.report import hardware
from switch_jax.tools import aot, roofline

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


def _counts(entry: dict) -> dict:
    return {"count": entry["count"], "bytes": entry["bytes"]}


def test_collectives_count_done_ops_and_loop_trips():
    c = hlo.collectives(HLO)
    assert _counts(c["all-to-all"]) == {"count": 1, "bytes": 1 * 4 * 2 * 20 * 128 * 2}
    assert _counts(c["all-gather"]) == {"count": 1, "bytes": 512 * 256 * 2}  # the -done only
    assert _counts(c["all-reduce"]) == {"count": 1 + 2, "bytes": 4 + 8192 * 128 * 4 + 2 * 8 * 4}
    assert _counts(c["reduce-scatter"]) == {"count": 12, "bytes": 12 * 16 * 128 * 4}
    assert _counts(c["collective-permute"]) == {"count": 0, "bytes": 0}
    assert c["loop_trips"] == [2, 6]
    assert c["dcn"] == {"count": 0, "bytes": 0, "reduce_bytes": 0}
    # No replica_groups in this excerpt: every group is "all" (the whole slice).
    assert c["all-reduce"]["by_group"] == {"all": c["all-reduce"]["bytes"]}


# Shapes of what libtpu 0.0.42 emits (seen in a v5e 2 x 4-chip multi-slice compile here): an
# async all-gather whose group is on its -start, iota, mesh and listed replica groups, a fused
# reduce-scatter ('all-reduce-scatter'), called from a loop body of 3 trips, and the megascale
# runtime's cross-slice sends.
HLO_GROUPS = """\
%all-reduce-scatter (input: f32[128,128]) -> f32[32,128] {
  %all-reduce.5 = f32[128,128]{1,0:T(8,128)} all-reduce(%input), channel_id=2, \
replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.clone
  ROOT %ds = f32[32,128]{1,0} dynamic-slice(%all-reduce.5, %m, %c)
}

%body.7 (p: (s32[], f32[128,128])) -> (s32[], f32[128,128]) {
  %fusion = f32[32,128]{1,0:T(8,128)} fusion(%x), kind=kCustom, calls=%all-reduce-scatter
  ROOT %t = (s32[], f32[128,128]) tuple(%i, %y)
}

%cond.7 (p: (s32[], f32[128,128])) -> pred[] {
  %k = s32[] constant(3)
  ROOT %lt = pred[] compare(%g, %k), direction=LT
}

ENTRY %main (a: bf16[8,64]) -> f32[8] {
  %ag-start = (bf16[8,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(%a), channel_id=5, \
replica_groups=[2,4]<=[8], dimensions={0}
  %ag-done = bf16[32,64]{1,0} all-gather-done(%ag-start)
  %a2a = bf16[4,16]{1,0} all-to-all(%b), channel_id=6, replica_groups=[4,2]<=[2,4]T(1,0)
  %ar = f32[8]{0} all-reduce(%c), channel_id=7, replica_groups={}, to_apply=%add
  %ar.2 = f32[16]{0} all-reduce(%e), channel_id=10, \
replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_0','axis_1'}, to_apply=%add
  %cp = f32[8]{0} collective-permute(%d), channel_id=8, source_target_pairs={{0,1},{1,0}}
  %w = (s32[], f32[128,128]) while(%init), condition=%cond.7, body=%body.7
  %send.1 = (f32[4,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%x3, %aa), channel_id=4, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name=\
"xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type=\
"ALL_REDUCE"}
  %send.2 = (bf16[64]{0}, u32[], token[]) send(%x4, %ab), channel_id=9, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  ROOT %r = f32[8]{0} copy(%z)
}
"""


def test_collective_groups_fused_reduce_scatter_and_dcn_sends():
    c = hlo.collectives(HLO_GROUPS)
    assert c["all-gather"]["by_group"] == {"4": 32 * 64 * 2}  # group from the -start
    assert c["all-to-all"]["by_group"] == {"2": 4 * 16 * 2}
    assert c["all-reduce"] == {"count": 2, "bytes": 24 * 4, "by_group": {"all": 32, "8": 64}}
    assert c["collective-permute"]["by_group"] == {"2": 8 * 4}
    # The fused all-reduce of 128 x 128 over 4 chips is a reduce-scatter to a 32 x 128 slice,
    # run once per trip of the loop that calls the fusion.
    shard = 32 * 128 * 4
    assert c["reduce-scatter"] == {"count": 3, "bytes": 3 * shard, "by_group": {"4": 3 * shard}}
    assert c["dcn"] == {
        "count": 2,
        "bytes": 4 * 8 * 128 * 4 + 64 * 2,
        "reduce_bytes": 4 * 8 * 128 * 4,
    }
    assert c["loop_trips"] == [3]


# A chip with round figures, so that every term below is derived by hand.
CHIP = hardware.Chip(
    "test", (), 100e12, hbm_bandwidth=1e12, ici_bandwidth=400e9, dcn_bandwidth=10e9
)


def _collectives(**kinds) -> dict:
    out = {k: {"count": 0, "bytes": 0, "by_group": {}} for k in hlo.COLLECTIVES}
    out.update(loop_trips=[], dcn={"count": 0, "bytes": 0, "reduce_bytes": 0})
    for kind, by_group in kinds.items():
        kind = kind.replace("_", "-")
        out[kind] = {"count": 1, "bytes": sum(by_group.values()), "by_group": by_group}
    return out


def test_roofline_terms_by_hand():
    gb = 1e9
    colls = _collectives(
        all_reduce={"4": 1 * gb},  # 2 x 1 GB x 3/4 = 1.5 GB sent
        all_to_all={"all": 2 * gb},  # over all 8 chips: 2 GB x 7/8 = 1.75 GB
        reduce_scatter={"2": 0.5 * gb},  # slice of 0.5 GB over 2: 0.5 GB
        all_gather={"8": 0.8 * gb},  # 0.8 GB x 7/8 = 0.7 GB
        collective_permute={"2": 0.05 * gb},
    )
    cost = {"flops": 2e12, "bytes": 50 * gb}
    e = roofline.estimate(cost, colls, CHIP, chips=8, model_flops=8 * 1e12)
    assert e["ici_bytes"] == pytest.approx((1.5 + 1.75 + 0.5 + 0.7 + 0.05) * gb)
    assert e["terms_s"]["compute"] == pytest.approx(2e12 / 100e12)  # 20 ms: cost > model
    assert e["terms_s"]["hbm"] == pytest.approx(50 * gb / 1e12)  # 50 ms
    assert e["terms_s"]["ici"] == pytest.approx(4.5 * gb / 200e9)  # half of 400 GB/s: 22.5 ms
    assert e["terms_s"]["dcn"] == 0.0 and e["unknown"] == []
    assert e["bound"] == "hbm" and e["step_s"] == pytest.approx(0.05)
    assert e["serial_s"] == pytest.approx(0.02 + 0.05 + 0.0225)
    assert e["mfu"] == pytest.approx(8e12 / (0.05 * 8 * 100e12))  # 20%
    text = roofline.format_estimate(e)
    assert ">= 50 ms per step on test, hbm-bound (MFU <= 20%)" in text
    assert "lower bound" in text and "DCN none" in text


def test_roofline_scales_loop_bodies_and_models_dcn():
    gb = 1e9
    colls = _collectives(all_reduce={"4": 1 * gb})
    colls["loop_trips"] = [6]
    colls["dcn"] = {"count": 2, "bytes": 3 * gb, "reduce_bytes": 2 * gb}
    # Loop bodies counted once: the model's 4e12 FLOPs per chip against 1e12 counted, so the
    # bytes are scaled by 4 as well.
    cost = {"flops": 1e12, "bytes": 10 * gb}
    e = roofline.estimate(cost, colls, CHIP, chips=16, num_slices=4, model_flops=16 * 4e12)
    assert e["loop_scale"] == 4 and e["flops_source"] == "model"
    assert e["terms_s"]["compute"] == pytest.approx(0.04)
    assert e["terms_s"]["hbm"] == pytest.approx(0.04)
    # DCN over 4 slices: the all-reduce sends 2 x 2 GB x 3/4, the other transfer 1 GB x 3.
    assert e["dcn_bytes"] == pytest.approx(3 * gb + 3 * gb)
    assert e["terms_s"]["dcn"] == pytest.approx(6 * gb / 10e9)
    assert e["bound"] == "dcn"
    # A chip without an ICI figure: that term is unknown, not zero, and the bound stays known.
    e = roofline.estimate(cost, colls, hardware.by_name("v4"), chips=16, model_flops=16 * 4e12)
    assert e["terms_s"]["ici"] is None and "ici" in e["unknown"]
    assert "ici unknown (no bandwidth figure)" in roofline.format_estimate(e)
    with pytest.raises(ValueError, match="unknown collective"):
        roofline.traffic("all-things", 1.0, 2)


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
