"""The serving workload: closed forms, conservation, scheduling invariants, located errors."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moesim.cost.layer_cost import MoELayerCost
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.engine.serving import ServingRecords, arrival_times, simulate_serving
from moesim.errors import ScenarioError
from moesim.loader import load_scenario, scenario_from_dict
from moesim.report.serving import latencies_s, serving_summary
from moesim.system import build_system

ONE_GPU: dict[str, Any] = {
    "name": "srv",
    "seed": 5,
    "cluster": "single-h100",
    "model": "olmoe-1b-7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 1, "ep": 1},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
}


def _workload(**over: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "kind": "serving",
        "duration_s": 5.0,
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "constant", "value": 128},
        "output_tokens": {"kind": "constant", "value": 8},
    }
    w.update(over)
    return w


@cache
def _moe_cost(key: str) -> MoELayerCost:
    """One memoized MoE cost per (cluster, model, layout, routing, seed): shared by runs."""
    base = json.loads(key)
    return simulated_layer_cost(build_system(scenario_from_dict({**base, "workload": _workload()})))


def simulate(base: dict[str, Any] = ONE_GPU, **workload: Any) -> tuple[ServingRecords, dict]:
    """Run a serving scenario on ``base`` with workload fields overridden."""
    scenario = scenario_from_dict({**base, "workload": _workload(**workload)})
    system = build_system(scenario)
    rec = simulate_serving(system, _moe_cost(json.dumps(base, sort_keys=True)))
    return rec, serving_summary(system, rec)


def test_md1_queue_wait_matches_pollaczek_khinchine() -> None:
    """One sequence at a time with fixed lengths is an M/D/1 queue: mean wait = rho S / (2(1 - rho))."""
    sched = {"max_seqs": 1, "chunked_prefill": False, "max_batch_tokens": 512}
    pilot, _ = simulate(duration_s=1.0, scheduler=sched)
    r = pilot.requests
    service = r.finish_s - r.first_scheduled_s
    s = float(service[0])
    assert np.allclose(service, s, rtol=1e-9)  # deterministic service time
    rho = 0.6
    rec, summary = simulate(
        duration_s=6000 * s / rho,
        scheduler=sched,
        arrival={"kind": "poisson", "rate_per_s": rho / s},
    )
    wait = rec.requests.first_scheduled_s - rec.requests.arrival_s
    expected = rho * s / (2 * (1 - rho))
    assert len(wait) > 5000
    assert float(wait.mean()) == pytest.approx(expected, rel=0.1)
    assert np.allclose(rec.requests.finish_s - rec.requests.first_scheduled_s, s, rtol=1e-9)
    # a stable queue keeps up: completions in the window = arrivals in it, but for the
    # few requests in the system at its two ends (the window's rates, not the drain's)
    window = summary["measured_window_s"]
    done, offered = summary["requests_per_s"] * window, summary["offered_requests_per_s"] * window
    assert abs(done - offered) <= 12
    assert summary["offered_requests_per_s"] == pytest.approx(rho / s, rel=4 / np.sqrt(6000))
    assert summary["throughput_tokens_per_s"] == pytest.approx(
        8 * summary["requests_per_s"], abs=16 / window
    )


def test_an_overloaded_server_reports_its_capacity_not_the_offered_load() -> None:
    """One sequence at a time with a fixed service time S, offered 3 / S requests/s: the
    server is busy throughout the window, so it completes window / S requests (+-1) in it
    while the offered rate is three times that; the drain (about 2 x the window here) is
    not in the rates."""
    sched = {"max_seqs": 1, "chunked_prefill": False, "max_batch_tokens": 512}
    pilot, _ = simulate(duration_s=1.0, scheduler=sched)
    s = float(pilot.requests.finish_s[0] - pilot.requests.first_scheduled_s[0])
    _, summary = simulate(
        duration_s=300 * s,
        warmup_s=20 * s,
        scheduler=sched,
        arrival={"kind": "poisson", "rate_per_s": 3 / s},
    )
    window = summary["measured_window_s"]
    assert window == pytest.approx(280 * s)
    assert summary["requests_per_s"] * window == pytest.approx(window / s, abs=1.0)
    assert summary["throughput_tokens_per_s"] * window == pytest.approx(8 * window / s, abs=8.0)
    assert summary["offered_requests_per_s"] == pytest.approx(3 / s, rel=4 / np.sqrt(840))
    assert summary["simulated_s"] > 2 * summary["duration_s"]  # a long drain, not counted


def test_a_server_that_keeps_up_reports_the_offered_load_despite_a_long_drain() -> None:
    """Nearly regular arrivals (gamma, cv 0.05) of 200-token requests that take seconds
    each: the tokens generated within [warmup_s, duration_s] match the tokens offered in
    it (within 5%), though the drain is a sizable part of the run (a rate over the window
    stretched to the last finish would read 15%+ low). The rates are recomputed here from
    the records: tokens sampled by iterations ending in the window, requests finishing in
    it."""
    rec, summary = simulate(
        duration_s=10.0,
        warmup_s=3.0,
        arrival={"kind": "gamma", "rate_per_s": 10.0, "cv": 0.05},
        output_tokens={"kind": "constant", "value": 200},
    )
    r, it = rec.requests, rec.iterations
    ends = it.start_s + it.duration_s
    in_win = (ends >= 3.0) & (ends <= 10.0)
    assert summary["measured_window_s"] == 7.0
    assert summary["window_output_tokens"] == int(it.sampled_tokens[in_win].sum())
    assert summary["throughput_tokens_per_s"] == pytest.approx(
        it.sampled_tokens[in_win].sum() / 7.0, abs=1e-6
    )
    finished = (r.finish_s >= 3.0) & (r.finish_s <= 10.0)
    assert summary["requests_per_s"] == pytest.approx(finished.sum() / 7.0, abs=1e-6)
    arrived = r.arrival_s >= 3.0
    assert summary["offered_tokens_per_s"] == pytest.approx(
        r.output_tokens[arrived].sum() / 7.0, abs=1e-6
    )
    assert summary["offered_tokens_per_s"] == pytest.approx(2000.0, rel=0.03)
    assert summary["throughput_tokens_per_s"] == pytest.approx(
        summary["offered_tokens_per_s"], rel=0.05
    )
    drain = summary["simulated_s"] - summary["duration_s"]
    stretched = summary["output_tokens"] / (summary["measured_window_s"] + drain)
    assert stretched < 0.85 * summary["offered_tokens_per_s"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.floats(1.0, 40.0),
    prompt=st.tuples(st.integers(1, 300), st.integers(0, 300)),
    output=st.tuples(st.integers(1, 40), st.integers(0, 40)),
    max_seqs=st.integers(1, 16),
    budget=st.integers(64, 1024),
    chunked=st.booleans(),
    kv_fraction=st.sampled_from([0.9, 0.004, 0.002]),
    seed=st.integers(0, 3),
)
def test_every_token_is_produced_exactly_once(
    rate, prompt, output, max_seqs, budget, chunked, kv_fraction, seed
) -> None:
    """Each served request gets exactly its output tokens; computed tokens add up; KV fits."""
    lo_p, hi_p = prompt[0], prompt[0] + prompt[1]
    lo_o, hi_o = output[0], output[0] + output[1]
    budget = max(budget, hi_p + hi_o) if not chunked else budget
    rec, summary = simulate(
        {**ONE_GPU, "seed": seed},
        duration_s=2.0,
        arrival={"kind": "poisson", "rate_per_s": rate},
        prompt_tokens={"kind": "uniform", "low": lo_p, "high": hi_p},
        output_tokens={"kind": "uniform", "low": lo_o, "high": hi_o},
        scheduler={"max_seqs": max_seqs, "max_batch_tokens": budget, "chunked_prefill": chunked},
        kv_cache_fraction=kv_fraction,
    )
    r, it = rec.requests, rec.iterations
    served = ~r.rejected
    # an overloaded draw (e.g. one sequence at a time at 30+ requests/s) cannot drain within
    # the 10x cap; conservation is checked on the runs that finish
    assume(rec.drained)
    assert summary["unfinished_requests"] == 0
    assert np.array_equal(r.generated_tokens[served], r.output_tokens[served])
    assert int(it.sampled_tokens.sum()) == int(r.output_tokens[served].sum())
    computed = r.prompt_tokens + r.output_tokens - 1 + r.recomputed_tokens
    assert int(it.batch_tokens.sum()) == int(computed[served].sum())
    assert int(it.kv_blocks_used.max(initial=0)) <= rec.kv_blocks_per_rank
    assert int(it.running_seqs.max(initial=0)) <= max_seqs
    lat = latencies_s(rec)
    assert np.all(lat["ttft"][served] <= lat["e2e"][served] + 1e-12)
    assert np.all(lat["queue_time"][served] >= 0)
    assert np.all(np.diff(it.start_s) > 0)


def test_tiny_kv_cache_preempts_and_still_finishes() -> None:
    """With a KV cache of a few requests, decodes preempt others and every request completes."""
    rec, summary = simulate(
        duration_s=3.0,
        arrival={"kind": "poisson", "rate_per_s": 40.0},
        prompt_tokens={"kind": "constant", "value": 200},
        output_tokens={"kind": "constant", "value": 60},
        kv_cache_fraction=0.002,
    )
    assert summary["preemptions"] > 0 and summary["recomputed_tokens"] > 0
    assert rec.drained and summary["completed_requests"] == summary["measured_requests"] > 50
    assert summary["kv_cache_utilization"]["max"] <= 1.0
    assert summary["rejected_requests"] == 0


def test_same_seed_gives_an_identical_summary() -> None:
    """Two runs of one scenario and seed (even with a fresh MoE cost memo) agree exactly."""
    scenario = scenario_from_dict({**ONE_GPU, "workload": _workload()})
    a = serving_summary(build_system(scenario), simulate_serving(build_system(scenario)))
    a2 = serving_summary(build_system(scenario), simulate_serving(build_system(scenario)))
    assert a == a2
    _, b = simulate()  # a shared memo evaluates a different number of sizes, nothing else
    assert {**a, "events": None} == {**b, "events": None}
    _, c = simulate({**ONE_GPU, "seed": 6})
    assert c != b


def test_more_load_never_lowers_mean_latency() -> None:
    """Mean E2E latency, averaged over seeds, grows with the arrival rate."""
    means = []
    for rate in (2.0, 10.0, 30.0):
        per_seed = []
        for seed in (1, 2, 3):
            _, s = simulate(
                {**ONE_GPU, "seed": seed},
                duration_s=3.0,
                arrival={"kind": "poisson", "rate_per_s": rate},
                prompt_tokens={"kind": "lognormal", "mean": 300, "sigma": 0.5, "max": 2000},
                output_tokens={"kind": "uniform", "low": 4, "high": 40},
                scheduler={"max_seqs": 8, "max_batch_tokens": 512},
            )
            per_seed.append(s["e2e_ms"]["mean"])
        means.append(float(np.mean(per_seed)))
    assert means[0] <= means[1] <= means[2], means


def test_skewed_routing_is_never_faster_than_uniform() -> None:
    """At a compute-bound load (long prompts), Zipf-skewed dropless routing overloads one
    EP rank, so serving is no faster than with uniform routing."""
    pair = {**ONE_GPU, "cluster": "h200x2", "model": "mixtral-8x7b"}
    pair["parallelism"] = {"dp": 2, "ep": 2}
    load = {
        "duration_s": 2.0,
        "arrival": {"kind": "poisson", "rate_per_s": 20.0},
        "prompt_tokens": {"kind": "constant", "value": 2048},
        "output_tokens": {"kind": "constant", "value": 2},
    }
    _, uniform = simulate(pair, **load)
    _, skewed = simulate({**pair, "routing": {"kind": "zipf", "s": 2.0}}, **load)
    assert skewed["e2e_ms"]["mean"] >= uniform["e2e_ms"]["mean"]
    assert skewed["time_breakdown_s"]["moe"] > uniform["time_breakdown_s"]["moe"]


def test_gamma_arrivals_have_the_asked_rate_and_burstiness() -> None:
    """Gamma inter-arrival times have mean 1/rate and coefficient of variation cv."""
    for cv in (0.5, 1.0, 3.0):
        scenario = scenario_from_dict(
            {
                **ONE_GPU,
                "workload": _workload(
                    duration_s=2000.0, arrival={"kind": "gamma", "rate_per_s": 10.0, "cv": cv}
                ),
            }
        )
        t, _, _ = arrival_times(scenario.workload, scenario.seed)  # type: ignore[arg-type]
        gaps = np.diff(t)
        assert gaps.mean() == pytest.approx(0.1, rel=0.05 * cv)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_trace_replay_serves_the_recorded_requests(write) -> None:
    """A CSV trace (relative to the scenario) is embedded on load and replayed row by row."""
    write("t.csv", "arrival_s,prompt_tokens,output_tokens\n0.0,100,5\n0.01,50,3\n0.5,20,1\n9,5,5\n")
    text = (
        "name: tr\ncluster: single-h100\nmodel: olmoe-1b-7b\nparallelism: {dp: 1, ep: 1}\n"
        "workload:\n  kind: serving\n  duration_s: 1\n  arrival: {kind: trace, path: t.csv}\n"
    )
    s = load_scenario(write("tr.yaml", text))
    assert s.workload.arrival.source == "t.csv"  # type: ignore[union-attr]
    assert "path" not in s.model_dump()["workload"]["arrival"] or (
        s.model_dump()["workload"]["arrival"]["path"] is None
    )
    rec = simulate_serving(build_system(s))
    r = rec.requests
    assert list(r.prompt_tokens) == [100, 50, 20] and list(r.output_tokens) == [5, 3, 1]
    assert list(r.generated_tokens) == [5, 3, 1] and rec.drained


SERVING_YAML = """\
name: t
cluster: single-h100
model: olmoe-1b-7b
parallelism: {dp: 1, ep: 1}
workload:
  kind: serving
  duration_s: 10
  warmup_s: 1
  arrival: {kind: poisson, rate_per_s: 2}
  prompt_tokens: {kind: uniform, low: 10, high: 100}
  output_tokens: {kind: constant, value: 16}
"""


def _errors(path: Path) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [str(i) for i in info.value.issues]


def test_serving_example_is_valid(write) -> None:
    """The baseline serving scenario of the error tests loads."""
    s = load_scenario(write("ok.yaml", SERVING_YAML))
    assert s.workload.kind == "serving"


def test_bad_serving_fields_are_located(write) -> None:
    """low > high and a bad rate are both reported, each at its own line and column."""
    text = SERVING_YAML.replace("low: 10", "low: 500").replace("rate_per_s: 2", "rate_per_s: 0")
    p = write("x.yaml", text)
    errs = _errors(p)
    assert f"{p}:9:28: workload.arrival.rate_per_s: must be > 0.0, got 0" in errs
    assert f"{p}:10:34: workload.prompt_tokens.low: must be <= high (100), got 500" in errs
    assert len(errs) == 2


def test_warmup_past_the_end_is_located(write) -> None:
    """A warm-up as long as the run would leave nothing to measure: rejected at its line."""
    p = write("x.yaml", SERVING_YAML.replace("warmup_s: 1", "warmup_s: 10"))
    assert _errors(p) == [f"{p}:8:3: workload.warmup_s: must be < duration_s (10.0), got 10.0"]


def test_weights_that_do_not_fit_name_device_and_sizes(write) -> None:
    """Mixtral on one H100 does not fit: the error names the device, need and capacity."""
    p = write("x.yaml", SERVING_YAML.replace("model: olmoe-1b-7b", "model: mixtral-8x7b"))
    (err,) = _errors(p)
    assert err.startswith(f"{p}:4:1: parallelism: the weights do not fit: each h100-sxm needs 87.")
    assert "but has 79.2 GiB" in err


def test_unchunked_prefill_needs_a_budget_for_the_longest_request(write) -> None:
    """Without chunked prefill, max_batch_tokens must hold the longest prompt + output."""
    text = SERVING_YAML + "  scheduler: {chunked_prefill: false, max_batch_tokens: 64}\n"
    p = write("x.yaml", text)
    (err,) = _errors(p)
    assert err == (
        f"{p}:12:39: workload.scheduler.max_batch_tokens: without chunked prefill it must be "
        ">= the longest request (prompt + output = 116 tokens), got 64"
    )


def test_missing_trace_file_is_located(write) -> None:
    """A trace path that cannot be read is reported at the path's line."""
    text = SERVING_YAML.replace(
        "arrival: {kind: poisson, rate_per_s: 2}", "arrival: {kind: trace, path: nope.csv}"
    ).replace(
        "  prompt_tokens: {kind: uniform, low: 10, high: 100}\n  output_tokens: {kind: constant, value: 16}\n",
        "",
    )
    p = write("x.yaml", text)
    (err,) = _errors(p)
    assert err.startswith(f"{p}:9:26: workload.arrival.path: cannot read file ") and "nope.csv" in err


def test_small_samples_are_flagged() -> None:
    from moesim.report.serving import RELIABLE_P99, sample_notes

    assert sample_notes(RELIABLE_P99) == []
    (note,) = sample_notes(6)
    assert "only 6 measured requests" in note
