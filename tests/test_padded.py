"""Capacity-padded experts (``policies.expert_compute: padded``): groups and capacities as
Mesh-TF computes them, costs that grow with the capacity factor, tokens conserved, the
layer's breakdown, located config errors, and the grouped default left as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim
from moesim import rng
from moesim.catalog import hardware
from moesim.config.policies import PoliciesConfig
from moesim.cost.compute import Roofline
from moesim.cost.padded import PaddedExperts
from moesim.engine.layer_sim import simulate_routed_layer
from moesim.engine.moe_layer import critical_path
from moesim.errors import ScenarioError
from moesim.loader import load_scenario
from moesim.routing.distributions import popularity
from moesim.routing.route import route_layer
from moesim.system import build_system

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "scenarios" / "quickstart.yaml"
PADDED = ("policies.expert_compute=padded", "policies.capacity_factor=1.25")


def _roofline(name: str = "tpu-v3") -> Roofline:
    return Roofline.of(hardware.accelerator(name), "bf16", 2)


def _layout(cf: float, group: int | None = 1024, experts: int = 128, k: int = 1) -> PaddedExperts:
    return PaddedExperts(cf, group, experts, k)


def test_groups_and_capacity_as_mesh_tf() -> None:
    """A rank's tokens in groups of at most group_size, capacity per group
    ceil(cf x s x k / E): Switch-Base's 8 / 10 / 16 rows per expert per group of 1024."""
    assert [_layout(cf).groups(8192).capacity for cf in (1.0, 1.25, 2.0)] == [8, 10, 16]
    g = _layout(1.0).groups(8192)
    assert (g.groups, g.group_tokens, g.rows_per_expert) == (8, 1024, 64)
    one = _layout(1.0, None).groups(8192)  # one group per rank: the Switch pseudocode
    assert (one.groups, one.group_tokens, one.capacity) == (1, 8192, 64)
    uneven = _layout(1.0).groups(2500)  # split evenly: 3 groups of 834 (the last padded)
    assert (uneven.groups, uneven.group_tokens) == (3, 834)
    # a capacity never exceeds the group: each token reaches an expert at most once
    assert PaddedExperts(4.0, None, 2, 2).groups(100).capacity == 100
    assert _layout(1.0).groups(0).rows_per_expert == 0


@settings(max_examples=60)
@given(
    tokens=st.integers(1, 20_000),
    group=st.one_of(st.none(), st.integers(1, 4096)),
    experts=st.sampled_from([8, 16, 64, 128]),
    k=st.integers(1, 2),
    cf=st.floats(0.25, 3.0),
    more=st.floats(0.01, 2.0),
)
def test_padded_work_grows_with_the_capacity_factor(
    tokens: int, group: int | None, experts: int, k: int, cf: float, more: float
) -> None:
    """Rows, mask bytes, einsum FLOPs and their times never fall as the capacity factor
    grows, and the rows cover at least the per-rank capacity the router keeps."""
    rf = _roofline()
    lo, hi = PaddedExperts(cf, group, experts, k), PaddedExperts(cf + more, group, experts, k)
    g_lo, g_hi = lo.groups(tokens), hi.groups(tokens)
    assert g_hi.rows_per_expert >= g_lo.rows_per_expert
    assert g_hi.mask_elements(experts) >= g_lo.mask_elements(experts)
    assert hi.masks_s(rf, tokens) >= lo.masks_s(rf, tokens)
    assert hi.einsum_s(rf, tokens, 768) >= lo.einsum_s(rf, tokens, 768)
    kept_cap = math.ceil(cf * tokens * k / experts)  # the router's capacity of the rank
    assert g_lo.rows_per_expert >= min(kept_cap, tokens)


def test_einsum_flops_are_two_s_e_c_d_on_the_matrix_units() -> None:
    """On a datasheet roofline (TPU v3, hard max), a large einsum takes its 2 g s E C d FLOPs
    at the product rate (compute-bound), and doubling the capacity doubles it."""
    rf = _roofline()
    lay = _layout(1.0)
    g = lay.groups(65536)
    flops = 2.0 * g.groups * g.group_tokens * 128 * g.capacity * 768
    t = lay.einsum_s(rf, 65536, 768)
    assert t == pytest.approx(flops / rf.flops_per_s + rf.overhead_s, rel=1e-9)
    t2 = _layout(2.0).einsum_s(rf, 65536, 768) - rf.overhead_s
    assert t2 == pytest.approx(2 * (t - rf.overhead_s), rel=1e-9)


def test_eager_masks_count_the_op_by_op_passes() -> None:
    """Fused masks write each [s, E, C] mask once (2 x 2 bytes per element); eager
    PyTorch code makes 22 k + 4 bytes of passes per element and relayouts the einsum
    operands; both grow with the capacity factor."""
    rf = _roofline()
    tokens = 32768
    for k in (1, 2):
        fused, eager = PaddedExperts(1.0, 2048, 128, k), PaddedExperts(1.0, 2048, 128, k, "eager")
        elements = fused.groups(tokens).mask_elements(128)
        assert fused.masks_s(rf, tokens) == pytest.approx(
            elements * 4 / rf.memory_bytes_per_s + 2 * rf.overhead_s, rel=1e-12
        )
        assert eager.masks_s(rf, tokens) == pytest.approx(
            elements * (22 * k + 4) / rf.memory_bytes_per_s + (2 + 6 * k) * rf.overhead_s,
            rel=1e-12,
        )
        assert eager.einsum_s(rf, tokens, 768) > fused.einsum_s(rf, tokens, 768)
        assert fused.relayout_s(rf, tokens, 768) == 0.0
    more = PaddedExperts(2.0, 2048, 128, 1, "eager")
    assert more.relayout_s(rf, tokens, 768) > PaddedExperts(1.0, 2048, 128, 1, "eager").relayout_s(
        rf, tokens, 768
    )


def _system_and_routing(*overrides: str):
    s = load_scenario(QUICK, list(overrides))
    system = build_system(s)
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    tokens = s.workload.tokens  # type: ignore[union-attr]
    routing = route_layer(
        rng.stream(s.seed, "routing", 0), pop, system.layout, tokens, s.model, s.policies
    )
    return system, routing


def test_padded_layer_sends_and_computes_the_full_capacity() -> None:
    """Every expert device computes groups x capacity rows of every rank; the all-to-all
    carries them all (kept or padding); the routing (kept, dropped) is the grouped one."""
    system, routing = _system_and_routing(*PADDED, "policies.group_size=512")
    rec = simulate_routed_layer(system, routing)
    lay = PaddedExperts.of(system.scenario.policies, system.scenario.model)
    assert lay is not None
    per_rank = [lay.groups(int(n)).rows_per_expert for n in routing.tokens_per_rank]
    ranks, experts_here = len(per_rank), system.scenario.model.experts // system.layout.ep
    for loads in rec.timeline.expert_loads.values():
        assert loads.tolist() == [sum(per_rank)] * experts_here
    # rows to other devices: each rank sends (ep - 1) of its ep slices over the network
    remote = sum(per_rank) * experts_here * (system.layout.ep - 1)
    assert rec.timeline.remote_tokens == remote
    assert ranks == system.layout.stage_ranks
    assert rec.routing.counts.sum() + rec.routing.dropped == routing.tokens_per_rank.sum() * 2
    # each expert device's compute interval is the expert kernel over those padded rows
    m, rf = system.scenario.model, system.layer_costs.roofline
    rows = np.full(experts_here, sum(per_rank))
    want = rf.grouped_ffn_s(rows, m.d_model, m.expert_d_ff, m.activation)
    for d, end in rec.timeline.expert_end_s.items():
        assert end - rec.timeline.expert_start_s[d] == pytest.approx(want, rel=1e-12)


def test_breakdown_reports_the_masks_and_einsums_and_sums_to_the_time() -> None:
    """The padded layer's critical path carves the mask/einsum work out of gate and
    combine, and its phases still sum to the layer time; a grouped layer reports the five
    phases it always did."""
    system, routing = _system_and_routing(*PADDED)
    rec = simulate_routed_layer(system, routing)
    path = critical_path(rec.timeline)
    assert list(path) == [
        "gate",
        "dispatch_einsum",
        "dispatch",
        "queue",
        "compute",
        "combine",
        "combine_einsum",
    ]
    assert path["dispatch_einsum"] > 0 and path["combine_einsum"] > 0
    assert sum(path.values()) == pytest.approx(rec.time_s, rel=1e-9)
    summary = moesim.run(load_scenario(QUICK, list(PADDED))).summary
    assert summary["breakdown_ms"]["dispatch_einsum"] > 0
    grouped = moesim.run(load_scenario(QUICK, ["policies.capacity_factor=1.25"])).summary
    assert list(grouped["breakdown_ms"]) == ["gate", "dispatch", "queue", "compute", "combine"]


def test_tokens_conserved_in_a_padded_summary() -> None:
    """Padding changes time, not routing: processed + dropped = tokens x top_k, and the
    expert loads are those of the grouped layer with the same seed."""
    padded = moesim.run(load_scenario(QUICK, list(PADDED))).summary
    grouped = moesim.run(load_scenario(QUICK, ["policies.capacity_factor=1.25"])).summary
    assert padded["processed_slots"] + padded["dropped_tokens"] == padded["slots"]
    assert padded["expert_load"] == grouped["expert_load"]
    assert padded["a2a_bytes"] > grouped["a2a_bytes"]
    assert padded["load_imbalance"] == 1.0  # every device computes the same padded rows


def test_padded_layer_time_grows_with_the_capacity_factor() -> None:
    """With padding the capacity factor costs time even where nothing more is kept."""
    times = [
        moesim.run(
            load_scenario(
                QUICK,
                ["policies.expert_compute=padded", f"policies.capacity_factor={cf}"],
            )
        ).summary["time_ms"]
        for cf in (1.0, 2.0, 4.0)
    ]
    assert times[0] < times[1] < times[2]


def test_grouped_is_the_default_and_unchanged() -> None:
    """Without the policy a scenario is grouped, and saying so changes nothing."""
    assert PoliciesConfig().expert_compute == "grouped"
    a = json.dumps(moesim.run(load_scenario(QUICK)).summary, sort_keys=True)
    b = moesim.run(load_scenario(QUICK, ["policies.expert_compute=grouped"])).summary
    assert a == json.dumps(b, sort_keys=True)


def _errors(path: Path) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [str(i) for i in info.value.issues]


BASE = """\
name: t
seed: 1
cluster: dgx-h100
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {overflow: drop, expert_compute: padded}
workload: {kind: layer, tokens: 1024}
"""


def test_padded_without_a_capacity_factor_is_a_located_error(write) -> None:
    """A padded layer needs a capacity: the error names file, line and field."""
    p = write("x.yaml", BASE)
    (err,) = _errors(p)
    assert err.startswith(f"{p}:7:28: policies.expert_compute: 'padded' sizes every expert")
    assert "capacity_factor" in err


def test_group_size_without_padding_is_a_located_error(write) -> None:
    """group_size and mask_build only mean something for padded layers."""
    p = write("x.yaml", BASE.replace("expert_compute: padded", "group_size: 64"))
    assert _errors(p) == [
        f"{p}:7:28: policies.group_size: applies to expert_compute 'padded' only, "
        "got expert_compute 'grouped'"
    ]
    p = write("y.yaml", BASE.replace("expert_compute: padded", "mask_build: eager"))
    assert _errors(p) == [
        f"{p}:7:28: policies.mask_build: applies to expert_compute 'padded' only, "
        "got expert_compute 'grouped'"
    ]
