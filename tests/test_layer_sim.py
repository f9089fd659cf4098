"""The layer workload end to end: determinism, conservation, skew, closed forms."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim
from moesim import rng
from moesim.catalog import hardware
from moesim.engine.layer_sim import simulate_routed_layer
from moesim.engine.moe_layer import critical_path
from moesim.loader import load_scenario
from moesim.routing.distributions import popularity
from moesim.routing.route import route_layer
from moesim.system import build_system
from moesim.topology.graph import rate

QUICK = Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml"


def _summary(path: Path | str, *overrides: str) -> dict:
    return moesim.run(load_scenario(path, list(overrides))).summary


def test_same_seed_same_summary() -> None:
    """The same scenario and seed give a byte-identical summary."""
    a = json.dumps(_summary(QUICK), sort_keys=True)
    b = json.dumps(_summary(QUICK), sort_keys=True)
    assert a == b


def test_different_seed_different_routing() -> None:
    """The seed drives the routing sample (so the test above is not vacuous)."""
    assert _summary(QUICK, "seed=1")["expert_load"] != _summary(QUICK, "seed=2")["expert_load"]


def test_tokens_conserved_in_summary() -> None:
    """processed + dropped slots = tokens x top_k, and expert_load sums to processed."""
    s = _summary(QUICK)
    assert s["processed_slots"] + s["dropped_tokens"] == s["tokens"] * s["top_k"]
    assert sum(s["expert_load"]) == s["processed_slots"]
    assert s["dropped_tokens"] > 0  # the quickstart's skew overflows capacity


@settings(max_examples=12, deadline=None)
@given(
    overflow=st.sampled_from(["drop", "reroute", "dropless"]),
    cf=st.floats(0.25, 2.0),
    tokens=st.integers(1, 3000),
    s=st.floats(0.0, 2.0),
)
def test_conservation_property(write_pair, overflow: str, cf: float, tokens: int, s: float) -> None:
    """Under every overflow policy, no slot is lost or invented by the whole simulation."""
    cf_text = "null" if overflow == "dropless" else str(cf)
    summary = _summary(
        write_pair,
        f"policies.overflow={overflow}",
        f"policies.capacity_factor={cf_text}",
        f"workload.tokens={tokens}",
        "routing.kind=zipf",
        f"routing.s={s}",
    )
    assert summary["processed_slots"] + summary["dropped_tokens"] == tokens * 2
    if overflow == "dropless":
        assert summary["dropped_tokens"] == 0
    cap = summary["capacity_per_expert"]
    if cap is not None:
        assert max(summary["expert_load"]) <= cap * 2  # two ranks, each its own group


def test_skew_never_faster_in_expectation() -> None:
    """Without a capacity cap, more skew never gives a shorter EP layer time (seed average);
    with a cap, skew shows up as more dropped tokens instead (the time is pinned by capacity).
    """
    means, drops = [], []
    for s in (0.0, 0.5, 1.0, 2.0):
        runs = [
            (
                _summary(
                    QUICK,
                    "policies.overflow=dropless",
                    "policies.capacity_factor=null",
                    f"routing.s={s}",
                    f"seed={seed}",
                    "workload.tokens=4096",
                )["time_ms"],
                _summary(
                    QUICK,
                    "policies.capacity_factor=1.0",
                    f"routing.s={s}",
                    f"seed={seed}",
                    "workload.tokens=4096",
                )["dropped_fraction"],
            )
            for seed in range(4)
        ]
        means.append(float(np.mean([t for t, _ in runs])))
        drops.append(float(np.mean([d for _, d in runs])))
    assert all(b >= a for a, b in itertools.pairwise(means)), means
    assert means[-1] > 1.5 * means[0]
    assert all(b >= a for a, b in itertools.pairwise(drops)), drops
    assert drops[-1] > drops[0]


def test_dispatch_time_matches_bytes_over_bandwidth(write_pair) -> None:
    """On two GPUs joined by NVLink, dispatch lasts bytes / link bandwidth + latency + the
    measured all-to-all alpha."""
    path = write_pair
    scenario = load_scenario(path)
    result = moesim.run(scenario)
    rec, tl = result.records, result.records.timeline
    counts = rec.routing.counts
    ln = hardware.link("nvlink4")
    bw = 18 * rate(ln) * 1e9  # NV18, at the link's measured achievable rate
    alpha = result.system.layer_costs.a2a_overhead_s
    assert alpha > 50e-6  # the H200 profile's measured all-to-all alpha
    d = scenario.model.d_model * 2  # bf16 bytes per token
    for src, dst in ((0, 1), (1, 0)):
        tokens = counts[src, 4 * dst : 4 * dst + 4].sum()  # experts of rank dst (contiguous)
        expected = tokens * d / bw + ln.latency_us * 1e-6 + alpha
        took = tl.ready_s[dst] - tl.gate_end_s[src]
        assert abs(took - expected) <= 1e-9 + 1e-6 * expected, (src, dst, took, expected)


@settings(max_examples=15, deadline=None)
@given(t1=st.integers(1, 20000), extra=st.integers(0, 20000))
def test_more_tokens_never_faster_on_one_device(t1: int, extra: int) -> None:
    """On one device, a larger batch never finishes the layer sooner (dropless)."""
    base = [
        "cluster=single-h100",
        "parallelism.dp=1",
        "parallelism.ep=1",
        "policies.capacity_factor=null",
        "policies.overflow=dropless",
    ]
    a = _summary(QUICK, *base, f"workload.tokens={t1}")["time_ms"]
    b = _summary(QUICK, *base, f"workload.tokens={t1 + extra}")["time_ms"]
    assert b >= a


def test_run_folder_reproduces(tmp_path: Path) -> None:
    """The run folder's resolved scenario reruns to the identical summary."""
    result = moesim.run(load_scenario(QUICK, ["output.trace=true"]))
    run_dir = result.write(tmp_path)
    assert {p.name for p in run_dir.iterdir()} == {
        "scenario.yaml",
        "summary.json",
        "run.json",
        "trace.json",
    }
    again = moesim.run(load_scenario(run_dir / "scenario.yaml")).summary
    assert again == json.loads((run_dir / "summary.json").read_text())
    trace = json.loads((run_dir / "trace.json").read_text())
    assert any(e.get("name") == "experts" for e in trace["traceEvents"])


@pytest.mark.parametrize(
    ("a2a", "min_flows"),
    [("direct", None), ("hierarchical", 0)],
    ids=["flow-by-flow", "batched"],
)
def test_layer_time_does_not_depend_on_when_it_starts(a2a: str, min_flows: int | None) -> None:
    """A layer simulated from t = 0 and the same layer an hour into a run (t = 3600 s) take
    the same time and critical path, within 1e-9 relative: DeepSeek-V3 EP 32 (1,024 messages
    a phase; flow by flow, with more than ``EXACT_FLOWS`` in flight so completions are
    batched, and on the batched network)."""
    s = load_scenario("scenarios/deepseek-v3-ep32-h800.yaml", [f"parallelism.a2a={a2a}"])
    system = build_system(s)
    if min_flows is not None:
        costs = dataclasses.replace(system.layer_costs, bulk_a2a_min_flows=min_flows)
        system = dataclasses.replace(system, layer_costs=costs)
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    routing = route_layer(
        rng.stream(s.seed, "routing", 0),
        pop,
        system.layout,
        1024,
        s.model,
        s.policies,
        system.expert_node,
    )
    at_0 = simulate_routed_layer(system, routing)
    later = simulate_routed_layer(system, routing, start_s=3600.0)
    assert later.time_s == pytest.approx(at_0.time_s, rel=1e-9)
    assert later.network_events == at_0.network_events
    # each phase is a difference of two clock readings, exact to the clock's resolution
    # at 3600 s (4.5e-13 s)
    path_0, path_later = critical_path(at_0.timeline), critical_path(later.timeline)
    for phase, seconds in path_0.items():
        tol = 16 * np.spacing(3600.0)
        assert path_later[phase] == pytest.approx(seconds, rel=1e-9, abs=tol), phase
    assert min(at_0.timeline.gate_end_s.values()) > 0.0  # the clock did start at 0 ...
    assert min(later.timeline.gate_end_s.values()) > 3600.0  # ... and an hour later
