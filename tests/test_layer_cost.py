"""The memoized per-layer cost used by long workloads follows the layer engine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.cost.layer_cost import bucket_points
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.loader import scenario_from_dict
from moesim.system import build_system

SCENARIO = {
    "name": "c",
    "seed": 4,
    "cluster": "dgx-h100",
    "model": "mixtral-8x7b",
    "routing": {"kind": "zipf", "s": 1.0},
    "parallelism": {"dp": 8, "ep": 8},
    "policies": {"capacity_factor": 1.0, "overflow": "drop"},
    "workload": {"kind": "layer", "tokens": 8},
}


def test_bucket_points_bracket_the_size() -> None:
    """Small sizes are exact; larger ones lie between two geometric buckets."""
    assert bucket_points(17) == (17, 17)
    for n in (65, 100, 1000, 12345):
        lo, hi = bucket_points(n)
        assert lo <= n <= hi and hi <= lo * 1.13 + 1


def test_cost_is_memoized_and_grows_with_tokens() -> None:
    """Repeated sizes reuse their simulation; more tokens never cost less (on average)."""
    cost = simulated_layer_cost(build_system(scenario_from_dict(SCENARIO)))
    t1 = cost.time_s(512)
    evaluated = cost.evaluations
    assert cost.time_s(512) == t1 and cost.evaluations == evaluated
    sizes = [1, 8, 64, 512, 4096, 16384]
    times = [cost.time_s(n) for n in sizes]
    assert all(b >= a for a, b in itertools.pairwise(times)), times
    assert cost.sample(16384).dropped_fraction > 0  # capacity 1.0 under Zipf skew drops


def test_matches_the_layer_workload_at_a_bucket() -> None:
    """At an exact bucket the cost is the layer engine's time, averaged over samples."""
    import moesim

    scenario = scenario_from_dict({**SCENARIO, "workload": {"kind": "layer", "tokens": 64}})
    cost = simulated_layer_cost(build_system(scenario), samples=8)
    single = moesim.run(scenario).summary["time_ms"] * 1e-3
    assert cost.time_s(64) == pytest.approx(single, rel=0.2)


def test_interpolated_sizes_keep_the_communication_share() -> None:
    """Between buckets, time and all-to-all share are interpolated, never dropped."""
    cost = simulated_layer_cost(build_system(scenario_from_dict(SCENARIO)))
    lo, hi = bucket_points(1000)
    assert lo < 1000 < hi
    a, b, mid = cost.sample(lo), cost.sample(hi), cost.sample(1000)
    assert min(a.comm_s, b.comm_s) <= mid.comm_s <= max(a.comm_s, b.comm_s)
    assert mid.comm_s > 0 and 0 < mid.comm_s < mid.time_s


def test_huge_batches_average_fewer_routing_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to SAMPLE_TOKENS / 3 tokens a bucket averages every sample; above, at most
    ceil(SAMPLE_TOKENS / tokens) of them, never fewer than one, and exactly that many
    layer simulations run."""
    from moesim.cost import layer_cost

    cost = simulated_layer_cost(build_system(scenario_from_dict(SCENARIO)))
    budget = layer_cost.SAMPLE_TOKENS
    assert cost.samples_for(1) == cost.samples_for(budget // 3) == 3
    assert cost.samples_for(budget // 2) == 2
    assert cost.samples_for(budget) == cost.samples_for(100 * budget) == 1
    calls = []
    real = cost.simulate  # the injected layer simulator prices each routing sample

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_cost, "SAMPLE_TOKENS", 32)
    monkeypatch.setattr(layer_cost, "SAMPLE_REL_SE", -1.0)  # no early stop here
    monkeypatch.setattr(cost, "simulate", counting)
    cost.time_s(64)  # sizes up to 64 are buckets of their own
    assert len(calls) == 1
    cost.time_s(16)
    assert len(calls) == 1 + 2
    cost.time_s(8)
    assert len(calls) == 1 + 2 + 3


def test_a_bucket_stops_sampling_once_its_mean_is_settled() -> None:
    """After two samples a bucket stops when the standard error of its mean time is
    within SAMPLE_REL_SE of it; samples that disagree more draw the third; the mean is
    that of the samples drawn."""
    from moesim.cost import layer_cost
    from moesim.cost.layer_cost import LayerRun

    cost = simulated_layer_cost(build_system(scenario_from_dict(SCENARIO)))
    n_links = len(cost.system.paths.bandwidth_gbps)
    plan = {40: [1.0, 1.001, 5.0], 50: [1.0, 1.1, 1.3]}  # ms per sample, by tokens (exact buckets)
    calls: dict[int, int] = {}

    def fake(system, routing):  # type: ignore[no-untyped-def]
        tokens = int(routing.tokens_per_rank.sum())
        i = calls.get(tokens, 0)
        calls[tokens] = i + 1
        return LayerRun(plan[tokens][i] * 1e-3, 0.0, np.zeros(n_links))

    cost.simulate = fake
    assert cost.samples_for(40) == cost.samples_for(50) == 3
    # 1.0 and 1.001: standard error 0.05% of the mean (<= 0.2%): two samples
    assert cost.sample(40).time_s == pytest.approx(1.0005e-3) and calls[40] == 2
    # 1.0 and 1.1: 4.8% > 0.2%: the third sample is drawn
    assert cost.sample(50).time_s == pytest.approx(3.4e-3 / 3) and calls[50] == 3
    assert layer_cost.SAMPLE_REL_SE == 0.002
