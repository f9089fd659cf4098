"""Failures and recovery: limits and closed forms, conservation, determinism, load errors."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moesim
from moesim.config.failures import FailuresConfig
from moesim.cost.iteration import IterationCost
from moesim.engine.layer_sim import simulate_routed_layer, simulated_layer_cost
from moesim.engine.training import simulate_training
from moesim.errors import ScenarioError
from moesim.failures.cost import FailedMoECost
from moesim.failures.degraded import degraded_system, unreachable
from moesim.failures.plan import build_plan, device_events
from moesim.failures.serving import ServingFailures, simulate_serving_with_failures
from moesim.failures.state import FailureState
from moesim.failures.training_run import checkpoint_bytes, expected, simulate_training_run
from moesim.loader import load_scenario, scenario_from_dict
from moesim.report.failures import (
    PHASES,
    failures_lines,
    iteration_phases,
    request_phases,
    serving_failures_summary,
)
from moesim.report.serving import serving_summary, serving_table
from moesim.routing.distributions import popularity
from moesim.routing.route import route_layer
from moesim.system import build_system

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"

PAIR: dict[str, Any] = {
    "name": "f",
    "seed": 5,
    "cluster": "h200x2",
    "model": "olmoe-1b-7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 2, "ep": 2},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
    "workload": {
        "kind": "serving",
        "duration_s": 5.0,
        "arrival": {"kind": "poisson", "rate_per_s": 8.0},
        "prompt_tokens": {"kind": "constant", "value": 128},
        "output_tokens": {"kind": "constant", "value": 16},
    },
}

TRAIN: dict[str, Any] = {
    "name": "t",
    "seed": 1,
    "cluster": "h200x2",
    "model": "olmoe-1b-7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 2, "ep": 2},
    "policies": {"capacity_factor": 1.25, "overflow": "drop"},
    "workload": {"kind": "training", "seq_len": 512, "microbatches": 2, "duration_s": 1000},
}


def _serve(failures: dict[str, Any] | None, base: dict[str, Any] = PAIR) -> dict[str, Any]:
    d = dict(base)
    if failures is not None:
        d["failures"] = failures
    return moesim.run(scenario_from_dict(d)).summary


def _fail_one(mode: str, replicas: int = 0) -> dict[str, Any]:
    return {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 2.0}],
        "recovery": {"on_expert_loss": mode, "replicas": replicas, "repair_s": 1.5},
    }


# --- limits -------------------------------------------------------------------------------


def test_mtbf_far_longer_than_the_run_never_fails() -> None:
    """An MTBF of a billion hours gives no failure, and the run equals the one without."""
    cfg = {"devices": [{"kind": "exponential", "mtbf_hours": 1e9}]}
    with_f = _serve(cfg)
    without = _serve(None)
    assert with_f["failures"]["device_failures"] == 0
    assert with_f["failures"]["availability"] == 1.0
    for key in ("completed_requests", "ttft_ms", "tpot_ms", "e2e_ms", "iterations"):
        assert with_f[key] == without[key], key


def test_training_without_failures_pays_only_checkpoints() -> None:
    """With nothing failing, goodput = tau / (tau + C) over whole intervals: the only loss
    is the checkpoint writes."""
    d = {
        **TRAIN,
        "failures": {
            "devices": [{"kind": "weibull", "mtbf_hours": 1e9, "shape": 0.7}],
            "checkpoint": {"interval_steps": 10, "write_gbps": 5.0},
        },
    }
    system = build_system(scenario_from_dict(d))
    step = replace(simulate_training(system, system.scenario.workload), step_s=1.0)
    c = checkpoint_bytes(system, system.scenario.workload) / (1 * 5.0e9)
    run = simulate_training_run(system, system.scenario.workload, step)
    assert run.interruptions == 0 and run.lost_steps == 0
    cycles = math.floor(1000 / (10 + c))
    left = 1000 - cycles * (10 + c)
    assert run.checkpoints == cycles
    assert run.useful_steps == cycles * 10 + min(10, math.floor(left + 1e-9))


# --- serving recovery ---------------------------------------------------------------------


def test_a_replica_loses_no_tokens_while_no_replica_drops_some() -> None:
    """Device 1 fails at 2 s: with replicas its experts' slots fail over (none dropped);
    with drop they are dropped; every request still completes (requeued)."""
    rep = _serve(_fail_one("replica", replicas=64))["failures"]
    drop = _serve(_fail_one("drop"))["failures"]
    assert rep["moe_slots"]["dropped_lost_expert"] == 0
    assert rep["moe_slots"]["failed_over"] > 0
    assert drop["moe_slots"]["dropped_lost_expert"] > 0
    assert drop["moe_slots"]["failed_over"] == 0
    for f in (rep, drop):
        assert f["lost_requests"] == 0
        assert f["device_failures"] == 1
        assert f["phases"]["during"]["iterations"] > 0


def test_reroute_drops_nothing_and_moves_load_to_the_live_experts() -> None:
    """Rerouting sends every slot of a dead expert to the token's next live choice: slots
    are conserved, the dead device's experts get none, the live ones get all."""
    d = {**PAIR, "failures": _fail_one("reroute")}
    system = build_system(scenario_from_dict(d))
    dead = frozenset({1})
    sys_f = degraded_system(system, FailureState(dead))
    cost = FailedMoECost(sys_f, simulated_layer_cost(system), dead=dead, mode="reroute")
    tokens, k = 512, system.scenario.model.top_k
    routing, over, rer, lost = cost.route(tokens, 0)
    owner = system.layout.owner
    assert lost == 0 and over == 0 and rer > 0
    assert routing.counts[:, owner == 1].sum() == 0
    assert routing.counts.sum() == tokens * k
    # healthy, each device's experts take about half of the slots; now device 0's take all
    assert routing.counts[:, owner == 0].sum() == tokens * k
    summary = _serve(_fail_one("reroute"))["failures"]
    assert summary["moe_slots"]["dropped_lost_expert"] == 0
    assert summary["moe_slots"]["rerouted"] > 0


def test_replica_conserves_slots_and_loads_the_replica_device() -> None:
    """With replicas, the dead device's slots land on the replica columns, owned by the
    live EP rank, and nothing is dropped."""
    d = {**PAIR, "failures": _fail_one("replica", replicas=64)}
    system = build_system(scenario_from_dict(d))
    dead = frozenset({1})
    sys_f = degraded_system(system, FailureState(dead))
    cost = FailedMoECost(sys_f, simulated_layer_cost(system), dead=dead, mode="replica")
    routing, over, _, lost = cost.route(256, 0)
    lay = sys_f.layout
    assert lost == 0 and over > 0
    assert routing.counts.sum() == 256 * system.scenario.model.top_k
    assert routing.counts[:, lay.owner == 1].sum() == 0
    assert routing.tokens_per_rank[1] == 0  # the dead DP rank holds no tokens


def test_failure_cost_link_bytes_are_the_degraded_routings() -> None:
    """The failure cost's link bytes come from the failed-over routing on the degraded
    system: with device 1 dead and its experts dropped, rank 0 keeps every token and
    sends none (its experts are local), where the healthy layer crosses the link."""
    d = {**PAIR, "failures": _fail_one("drop")}
    system = build_system(scenario_from_dict(d))
    dead = frozenset({1})
    sys_f = degraded_system(system, FailureState(dead))
    healthy = simulated_layer_cost(system)
    cost = FailedMoECost(sys_f, healthy, dead=dead, mode="drop")
    for tokens in (64, 300):  # a bucket, and between two buckets
        bytes_f = cost.link_bytes(tokens)
        assert bytes_f.shape == (sys_f.paths.bandwidth_gbps.shape[0],)
        assert bytes_f.sum() == 0.0
        assert healthy.link_bytes(tokens).sum() > 0.0
    assert cost.evaluations == 3 and cost.sim_events > 0  # 64, and the two around 300
    assert cost.time_s(256) == cost.sample(256).time_s > 0


def test_without_replicas_drop_loses_tokens_and_lose_loses_requests() -> None:
    """on_rank_loss: lose drops the failed rank's requests; requeue keeps them all."""
    lose = _fail_one("drop")
    lose["recovery"]["on_rank_loss"] = "lose"
    summary = _serve(lose)
    assert summary["failures"]["lost_requests"] > 0
    assert summary["completed_requests"] < _serve(None)["completed_requests"]


def test_requests_wait_for_a_recovery_when_every_rank_is_down() -> None:
    """On one GPU a failure stops the server until the repair; nothing is lost."""
    one = {
        **PAIR,
        "cluster": "single-h100",
        "parallelism": {"dp": 1, "ep": 1},
        "failures": {
            "devices": [{"kind": "scheduled", "device": 0, "at_s": 1.0}],
            "recovery": {"repair_s": 2.0},
        },
    }
    rec = simulate_serving_with_failures(build_system(scenario_from_dict(one)))
    starts = rec.iterations.start_s
    assert not np.any((starts >= 1.0) & (starts < 3.0))
    assert np.any(starts < 1.0) and np.any(starts >= 3.0)
    assert np.isfinite(rec.requests.finish_s).all()


# --- stragglers and links -----------------------------------------------------------------


def test_a_straggler_slows_the_lock_step_iteration_by_its_factor() -> None:
    """On one device every part of the iteration is that device's compute: it takes
    exactly `slowdown` times longer; on two, between 1x and the factor."""
    for cluster, par, exact in (
        ("single-h100", {"dp": 1, "ep": 1}, True),
        ("h200x2", {"dp": 2, "ep": 2}, False),
    ):
        d = {
            **PAIR,
            "cluster": cluster,
            "parallelism": par,
            "failures": {"stragglers": [{"device": 0, "slowdown": 1.5}]},
        }
        system = build_system(scenario_from_dict(d))
        base = IterationCost(system, simulated_layer_cost(system))
        sf = ServingFailures(system, 10.0)
        assert sf.plan.states[0].slow == ((0, 1.5),)
        n = par["dp"]
        args = ([2048] * n, [2048.0 * 2049 / 2] * n, [2048] * n, [1] * n)
        slow = sf.iteration_time(base, *args).total_s
        ref = base.time(*args).total_s
        if exact:
            assert slow == pytest.approx(1.5 * ref, rel=1e-12)
        else:
            assert ref < slow <= 1.5 * ref + 1e-12


def _nic_system(layer_tokens: int = 2048) -> Any:
    d = {
        "name": "nic",
        "seed": 2,
        "cluster": {
            "preset": "h100-fat-tree",
            "nodes": 2,
            "accelerators_per_node": 2,
            "fabric": {"nics_per_node": 2},
        },
        "model": "olmoe-1b-7b",
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": 4, "ep": 4},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {"kind": "layer", "tokens": layer_tokens},
    }
    return build_system(scenario_from_dict(d))


def test_a_degraded_nic_never_speeds_the_layer_up() -> None:
    """The same routing over a NIC at 1, 1/2, 1/4, 1/16 of its bandwidth: the layer time
    never decreases, and a slower NIC takes strictly longer once it is the bottleneck."""
    system = _nic_system()
    s = system.scenario
    pop = popularity(s.routing, s.model.experts, np.random.default_rng(0))
    routing = route_layer(np.random.default_rng(1), pop, system.layout, 2048, s.model, s.policies)
    times = []
    for frac in (1.0, 0.5, 0.25, 1 / 16):
        state = FailureState(links=((0, "nic", frac),)) if frac < 1 else FailureState()
        times.append(simulate_routed_layer(degraded_system(system, state), routing).time_s)
    assert all(b >= a - 1e-15 for a, b in itertools.pairwise(times))
    assert times[-1] > times[0]


def test_a_downed_nic_cuts_its_device_off_and_a_downed_nvlink_falls_back_to_pcie() -> None:
    """Every link of a GPU down: it is unreachable, so dead in the plan. Only its NIC down:
    its traffic relays over NVLink to a neighbour's NIC (as NCCL's PXN does), so it stays.
    NVLink down on a DGX: traffic takes PCIe, slower but alive."""
    system = _nic_system()
    assert unreachable(system.topology, FailureState(links=((0, "all", 0.0),))) == {0}
    assert unreachable(system.topology, FailureState(links=((0, "nic", 0.0),))) == frozenset()
    failures = {"links": [{"device": 0, "link": "all", "at_s": 1.0, "until_s": 2.0, "down": True}]}
    served = {**PAIR, "cluster": system.scenario.cluster.model_dump(mode="json")}
    served["parallelism"] = {"dp": 4, "ep": 4}
    plan = build_plan(build_system(scenario_from_dict({**served, "failures": failures})), 10.0)
    assert plan.at(1.5).dead == {0} and plan.at(2.5).healthy
    dgx = {**PAIR, "cluster": "dgx-h100", "parallelism": {"dp": 8, "ep": 8}}
    dgx["workload"] = {"kind": "layer", "tokens": 2048}
    sys8 = build_system(scenario_from_dict(dgx))
    down = FailureState(links=((0, "scale_up", 0.0),))
    assert unreachable(sys8.topology, down) == frozenset()
    s = sys8.scenario
    pop = popularity(s.routing, s.model.experts, np.random.default_rng(0))
    routing = route_layer(np.random.default_rng(1), pop, sys8.layout, 2048, s.model, s.policies)
    healthy = simulate_routed_layer(sys8, routing).time_s
    assert simulate_routed_layer(degraded_system(sys8, down), routing).time_s > healthy


# --- training: checkpoint-restart ---------------------------------------------------------


def _training_run(failures: dict[str, Any], step_s: float, c_s: float | None = None) -> Any:
    """A training run of TRAIN with the step time set to ``step_s`` and the checkpoint
    write bandwidth chosen so that one write takes ``c_s``."""
    d = {**TRAIN, "failures": failures}
    system = build_system(scenario_from_dict(d))
    w = system.scenario.workload
    if c_s is not None:
        gbps = checkpoint_bytes(system, w) / (len(system.topology.hosts) * 1e9 * c_s)
        failures = json.loads(json.dumps(failures))
        failures["checkpoint"]["write_gbps"] = gbps
        system = build_system(scenario_from_dict({**d, "failures": failures}))
        w = system.scenario.workload
    step = replace(simulate_training(system, w), step_s=step_s)
    return simulate_training_run(system, w, step), system


def test_checkpoint_restart_goodput_matches_exact_arithmetic() -> None:
    """Steps of 10 s, a checkpoint every 10 steps taking 20 s, a failure at 250 s (during
    the third interval's first step after 240 s), a 30 s spare swap and a 50 s restart,
    over 1000 s:

    0-100 train, 100-120 ckpt, 120-220 train, 220-240 ckpt, 240-250 one step (lost),
    250-280 down, 280-330 restart, then five full intervals to 930 and 7 steps to 1000:
    useful = 20 + 50 + 7 = 77 steps, goodput 0.77, availability (780 + 140) / 1000."""
    failures = {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 250}],
        "recovery": {"hot_spares": 1, "spare_swap_s": 30, "repair_s": 5000},
        "checkpoint": {"interval_steps": 10, "restart_s": 50},
    }
    run, _ = _training_run(failures, step_s=10.0, c_s=20.0)
    assert run.useful_steps == 77
    assert run.lost_steps == 1 and run.interruptions == 1
    assert run.checkpoints == 7
    assert run.lost_s == pytest.approx(10.0)
    assert run.down_s == pytest.approx(30.0) and run.restart_s == pytest.approx(50.0)
    assert run.compute_s == pytest.approx(780.0)
    assert run.checkpoint_total_s == pytest.approx(140.0)
    kinds = [sp.kind for sp in run.spans]
    assert kinds[:6] == ["train", "checkpoint", "train", "checkpoint", "train", "down"]


def test_without_a_spare_the_job_waits_for_the_repair() -> None:
    """The same failure without a spare waits repair_s (200 s) instead of the swap."""
    failures = {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 250}],
        "recovery": {"hot_spares": 0, "spare_swap_s": 30, "repair_s": 200},
        "checkpoint": {"interval_steps": 10, "restart_s": 50},
    }
    run, _ = _training_run(failures, step_s=10.0, c_s=20.0)
    assert run.down_s == pytest.approx(200.0)
    # down 250-450, restart to 500, four intervals to 980, then 20 s left: two steps
    assert run.useful_steps == 20 + 40 + 2


def test_detection_time_is_downtime() -> None:
    """Noticing the failure takes 40 s before the 30 s swap: down 250-320, restart to 370,
    five intervals to 970, then 30 s left: three steps: 20 + 50 + 3 useful."""
    failures = {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 250}],
        "recovery": {"hot_spares": 1, "spare_swap_s": 30, "detect_s": 40},
        "checkpoint": {"interval_steps": 10, "restart_s": 50},
    }
    run, _ = _training_run(failures, step_s=10.0, c_s=20.0)
    assert run.down_s == pytest.approx(70.0)
    assert run.useful_steps == 73


def test_serving_stalls_until_the_failure_is_noticed() -> None:
    """No iteration starts between the failure (2 s) and its detection (2.5 s)."""
    f = _fail_one("drop")
    f["recovery"]["detect_s"] = 0.5
    rec = simulate_serving_with_failures(build_system(scenario_from_dict({**PAIR, "failures": f})))
    starts = rec.iterations.start_s
    assert not np.any((starts >= 2.0) & (starts < 2.5))
    assert rec.failures is not None
    kinds = [e.kind for e in rec.failures.plan.events]
    assert kinds == ["fail", "detected", "recover"]
    assert np.isfinite(rec.requests.finish_s).all()


def test_exponential_goodput_matches_the_renewal_closed_form() -> None:
    """Exponential failures (job MTBF 2000 s), tau = 100 s, C = 10 s, D = 10 + 20 s: the
    simulated goodput over a long run is within 2% of tau / ((e^((tau+C)/M) - 1)(M + D))."""
    failures = {
        "devices": [{"kind": "exponential", "mtbf_hours": 4000 / 3600}],
        "recovery": {"hot_spares": 2, "spare_swap_s": 10, "repair_s": 1},
        "checkpoint": {"interval_steps": 100, "restart_s": 20},
    }
    d = {**TRAIN, "workload": {**TRAIN["workload"], "duration_s": 2.0e6}}
    goodputs = []
    for seed in (1, 2):
        d["seed"] = seed
        system = build_system(scenario_from_dict({**d, "failures": failures}))
        w = system.scenario.workload
        gbps = checkpoint_bytes(system, w) / (1e9 * 10.0)
        f2 = json.loads(json.dumps(failures))
        f2["checkpoint"]["write_gbps"] = gbps
        system = build_system(scenario_from_dict({**d, "failures": f2}))
        step = replace(simulate_training(system, system.scenario.workload), step_s=1.0)
        run = simulate_training_run(system, system.scenario.workload, step)
        assert run.interruptions > 500
        goodputs.append(run.useful_steps * 1.0 / run.duration_s)
        closed = expected(system.scenario.failures, 2, 1.0, 100, run.checkpoint_s)
    assert closed["job_mtbf_s"] == pytest.approx(2000.0)
    assert np.mean(goodputs) == pytest.approx(closed["goodput_fraction"], rel=0.01)
    assert closed["young_interval_s"] == pytest.approx(math.sqrt(2 * 10.0 * 2000.0))


def test_young_interval_beats_shorter_and_longer_ones() -> None:
    """With the setup above, checkpointing every sqrt(2 C M) = 200 s of compute gives more
    goodput than every 63 s or every 400 s, in the simulation as in the closed form."""
    failures: dict[str, Any] = {
        "devices": [{"kind": "exponential", "mtbf_hours": 4000 / 3600}],
        "recovery": {"hot_spares": 2, "spare_swap_s": 10, "repair_s": 1},
        "checkpoint": {"interval_steps": 100, "restart_s": 20},
    }
    d = {**TRAIN, "workload": {**TRAIN["workload"], "duration_s": 1.0e6}}
    system = build_system(scenario_from_dict({**d, "failures": failures}))
    gbps = checkpoint_bytes(system, system.scenario.workload) / (1e9 * 10.0)
    goodput = {}
    for interval in (63, 200, 400):
        f = json.loads(json.dumps(failures))
        f["checkpoint"].update(write_gbps=gbps, interval_steps=interval)
        system = build_system(scenario_from_dict({**d, "failures": f}))
        step = replace(simulate_training(system, system.scenario.workload), step_s=1.0)
        goodput[interval] = simulate_training_run(
            system, system.scenario.workload, step
        ).useful_steps
    assert goodput[200] > goodput[63] and goodput[200] > goodput[400]


def test_a_training_straggler_stretches_every_step() -> None:
    """A 1.5x straggler for the whole run, nothing failing, no checkpoints: the run does
    floor(T / (1.5 step)) steps; NVLink at a quarter of its bandwidth never speeds a step."""
    failures = {"stragglers": [{"device": 1, "slowdown": 1.5}]}
    run, system = _training_run(failures, step_s=2.0)
    assert run.useful_steps == math.floor(1000 / 3.0)
    slow_links = {
        "links": [{"device": 0, "link": "scale_up", "at_s": 0, "bandwidth_fraction": 0.25}]
    }
    run_l, _ = _training_run(slow_links, step_s=2.0)
    base = simulate_training(system, system.scenario.workload).step_s
    d = {**TRAIN, "failures": slow_links}
    degraded = degraded_system(
        build_system(scenario_from_dict(d)), FailureState(links=((0, "scale_up", 0.25),))
    )
    slow_step = simulate_training(degraded, degraded.scenario.workload).step_s
    assert slow_step >= base
    # a link state's step is simulated on the degraded system
    assert run_l.useful_steps == math.floor(1000 / slow_step + 1e-9)


# --- failure processes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "proc",
    [
        {"kind": "exponential", "mtbf_hours": 1.0},
        {"kind": "weibull", "mtbf_hours": 1.0, "shape": 2.0},
        {"kind": "weibull", "mtbf_hours": 1.0, "shape": 0.7},
    ],
    ids=["exponential", "weibull-2", "weibull-0.7"],
)
def test_failure_count_is_duration_over_mtbf(proc: dict[str, Any]) -> None:
    """8 devices, MTBF 1 h, repairs of 1 s, 100 h: about 800 failures per seed (renewal
    theory: duration / (MTBF + repair) per device), within 4 Poisson sigmas (the Weibull
    processes are less or more regular than Poisson: 6 sigmas for shape 0.7)."""
    cfg = FailuresConfig.model_validate({"devices": [proc], "recovery": {"repair_s": 1.0}})
    horizon = 100 * 3600.0
    mean = 8 * horizon / (3600.0 + 1.0)
    counts = []
    for seed in range(4):
        events = device_events(cfg, 8, seed, horizon)
        counts.append(sum(e.kind == "fail" for e in events))
        assert all(e.time_s < horizon for e in events)
    tol = (6 if proc.get("shape") == 0.7 else 4) * math.sqrt(mean)
    assert all(abs(c - mean) < tol for c in counts), counts
    assert abs(np.mean(counts) - mean) < tol / 2


def test_failures_are_deterministic_per_seed() -> None:
    """The same seed gives the same failures and summary; another seed other failures."""
    cfg = {
        "devices": [{"kind": "exponential", "mtbf_hours": 2 / 3600}],
        "recovery": {"on_expert_loss": "reroute", "repair_s": 0.5},
    }
    a, b = _serve(cfg), _serve(cfg)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["failures"]["device_failures"] > 0
    other = _serve(cfg, {**PAIR, "seed": 6})
    assert other["failures"]["events"] != a["failures"]["events"]


def test_hot_spares_shorten_the_outage() -> None:
    """A spare comes in after spare_swap_s; the repaired device rejoins the spare pool."""
    cfg = FailuresConfig.model_validate(
        {
            "devices": [
                {"kind": "scheduled", "device": 0, "at_s": 10},
                {"kind": "scheduled", "device": 1, "at_s": 20},
                {"kind": "scheduled", "device": 0, "at_s": 500},
            ],
            "recovery": {"hot_spares": 1, "spare_swap_s": 5, "repair_s": 100},
        }
    )
    ev = [(e.time_s, e.kind, e.device) for e in device_events(cfg, 2, 0, 1000)]
    # device 0 swaps in the spare (back at 15); device 1 has none and waits for the
    # repair (back at 120); by 500 the repaired device 0 is a spare again
    assert ev == [
        (10, "fail", 0),
        (15, "recover", 0),
        (20, "fail", 1),
        (120, "recover", 1),
        (500, "fail", 0),
        (505, "recover", 0),
    ]


# --- the run folder and the examples ------------------------------------------------------


def test_run_folder_trace_shows_the_failure_and_the_recovery(tmp_path: Path) -> None:
    d = {**PAIR, "failures": _fail_one("replica", replicas=64), "output": {"trace": True}}
    result = moesim.run(scenario_from_dict(d))
    folder = result.write(tmp_path)
    trace = json.loads((folder / "trace.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert any(n.startswith("fail ") for n in names)
    assert any(n.startswith("recover ") for n in names)
    assert "dead 1" in names and "iteration" in names
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failures"]["device_failures"] == 1


def test_training_run_trace_has_checkpoints_and_restarts(tmp_path: Path) -> None:
    failures = {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 250}],
        "recovery": {"hot_spares": 1, "spare_swap_s": 30},
        "checkpoint": {"interval_steps": 100, "restart_s": 50},
    }
    d = {**TRAIN, "failures": failures, "output": {"trace": True}}
    result = moesim.run(scenario_from_dict(d))
    folder = result.write(tmp_path)
    cats = {e.get("name") for e in json.loads((folder / "trace.json").read_text())["traceEvents"]}
    assert {"train", "checkpoint", "down", "restart"} <= cats
    assert (folder / "step_trace.json").exists()
    f = result.summary["failures"]
    parts = f["time_s"]
    busy = parts["train"] + parts["checkpoint"] + parts["down"] + parts["restart"]
    tail = f["step_s"] + f["checkpoint"]["write_s"]  # what may not fit before the end
    assert f["run_s"] - tail - 1e-6 < busy <= f["run_s"] + 1e-6


def test_serving_failure_example_shows_before_during_after() -> None:
    s = load_scenario(
        SCENARIOS / "mixtral-serving-failure-dgx-h100.yaml",
        # a shorter run: the link event (52 s) and the straggler (45 s) would start after
        # its end, which is a load error, so they go
        [
            "workload.duration_s=24",
            "workload.arrival.rate_per_s=4",
            "workload.warmup_s=1",
            "failures.links=[]",
            "failures.stragglers=[]",
        ],
    )
    f = moesim.run(s).summary["failures"]
    assert f["device_failures"] == 1 and f["moe_slots"]["dropped_lost_expert"] == 0
    assert f["phases"]["before"]["requests"] > 0 and f["phases"]["during"]["requests"] > 0
    assert (
        f["phases"]["during"]["iteration_ms"]["mean"]
        > f["phases"]["before"]["iteration_ms"]["mean"]
    )


def test_training_example_reports_closed_forms() -> None:
    s = load_scenario(
        SCENARIOS / "training-checkpoint-restart-h100.yaml",
        ["workload.seq_len=256", "workload.microbatches=4"],
    )
    f = moesim.run(s).summary["failures"]
    assert f["interruptions"] >= 1 and f["lost_steps"] > 0
    assert 0 < f["goodput_fraction"] < f["availability"] <= 1
    assert f["expected"]["young_interval_s"] > 0


# --- load-time errors ---------------------------------------------------------------------


def _errors(write: Any, text: str) -> list[str]:
    p = write("x.yaml", text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(p)
    return [str(i) for i in info.value.issues]


TRAIN_YAML = """\
name: t
cluster: h200x2
model: olmoe-1b-7b
parallelism: {dp: 2, ep: 2}
workload: {kind: training, seq_len: 512, microbatches: 2, duration_s: 100}
failures:
  checkpoint: {interval_steps: 0}
"""


def test_checkpoint_interval_zero_is_a_located_error(write: Any) -> None:
    errs = _errors(write, TRAIN_YAML)
    assert len(errs) == 1
    assert errs[0].endswith(":7:16: failures.checkpoint.interval_steps: must be > 0, got 0")


def test_both_or_no_interval_is_an_error(write: Any) -> None:
    errs = _errors(write, TRAIN_YAML.replace("{interval_steps: 0}", "{restart_s: 5}"))
    assert any("give exactly one of interval_s and interval_steps" in e for e in errs)


def test_unknown_device_index_is_a_located_error(write: Any) -> None:
    text = TRAIN_YAML.replace(
        "  checkpoint: {interval_steps: 0}",
        "  devices:\n    - {kind: scheduled, device: 9, at_s: 5}\n  checkpoint: {interval_steps: 5}",
    )
    errs = _errors(write, text)
    assert len(errs) == 1 and ":8:" in errs[0]
    assert errs[0].endswith(
        "failures.devices[0].device: device 9 does not exist: the cluster has devices 0..1"
    )


SERVE_YAML = """\
name: s
cluster: dgx-h100
model: mixtral-8x7b
parallelism: {dp: 8, ep: 2}
workload:
  kind: serving
  duration_s: 10
  arrival: {kind: poisson, rate_per_s: 1}
  prompt_tokens: {kind: constant, value: 100}
  output_tokens: {kind: constant, value: 10}
failures:
  recovery: {on_expert_loss: replica, replicas: 8}
"""


def test_replicas_that_do_not_fit_are_rejected(write: Any) -> None:
    """Mixtral with ep=2 holds 4 experts (45 GiB) per H100; 4 more replicas do not fit."""
    errs = _errors(write, SERVE_YAML)
    assert len(errs) == 1 and "failures.recovery.replicas: the replicas do not fit" in errs[0]
    assert ":12:" in errs[0]
    ok = SERVE_YAML.replace("ep: 2}", "ep: 8}")
    assert load_scenario(write("ok.yaml", ok)).failures is not None


def test_bad_combinations_are_rejected(write: Any) -> None:
    errs = _errors(
        write, SERVE_YAML.replace("replicas: 8}", "replicas: 0}\n  checkpoint: {interval_s: 10}")
    )
    assert any("on_expert_loss 'replica' needs replicas" in e for e in errs)
    assert any("checkpoint-restart applies to training workloads" in e for e in errs)
    no_len = TRAIN_YAML.replace(", duration_s: 100", "").replace(
        "interval_steps: 0", "interval_steps: 5"
    )
    assert any(
        "workload.duration_s: required with a failures section" in e for e in _errors(write, no_len)
    )
    link = SERVE_YAML.replace(
        "  recovery: {on_expert_loss: replica, replicas: 8}",
        "  links:\n    - {device: 0, link: nic, at_s: 1, until_s: 0.5, down: true}",
    )
    errs = _errors(write, link)
    assert any("until_s: must be > at_s (1.0), got 0.5" in e for e in errs)


def test_a_cut_off_device_in_a_tp_group_is_dead_not_a_crash() -> None:
    """tp=2 on a DGX: every link of GPU 3 down for a second makes it (and its DP rank)
    dead for that second; its experts' tokens reroute, and the run drains."""
    d = {
        **PAIR,
        "cluster": "dgx-h100",
        "parallelism": {"dp": 4, "tp": 2, "ep": 8},
        "workload": {**PAIR["workload"], "duration_s": 3.0},
        "failures": {
            "links": [{"device": 3, "link": "all", "at_s": 1.0, "until_s": 2.0, "down": True}],
            "recovery": {"on_expert_loss": "reroute"},
        },
    }
    rec = simulate_serving_with_failures(build_system(scenario_from_dict(d)))
    assert rec.failures is not None
    assert [st.dead for st in rec.failures.plan.states] == [frozenset(), {3}, frozenset()]
    assert rec.failures.rerouted_fraction.max() > 0 and rec.failures.lost_fraction.max() == 0
    assert rec.drained


# --- reporting: phases, windows, goodput, events in the run ------------------------------


def test_request_phases_of_a_hand_built_case() -> None:
    """Device failure windows [2, 3.5) and [6, 7): a request is before if it finished by
    the first failure, during if [arrival, finish] overlaps a window (unfinished: to the
    end of the run), after if it arrived at or after the last recovery, else between."""
    arrival = np.array([0.0, 1.0, 3.6, 4.0, 7.5, 7.2, 1.0, 3.5, 0.5, 3.4])
    finish = np.array([1.9, 2.5, 5.0, 6.5, 8.0, np.nan, np.nan, 3.6, 2.0, 3.45])
    got = request_phases(arrival, finish, [(2.0, 3.5), (6.0, 7.0)], end_s=9.0)
    names = [PHASES[k] for k in got]
    assert names == [
        "before",  # finished before the first failure
        "during",  # decoding through the failure at 2 s
        "between",  # wholly in the healthy gap
        "during",  # arrived in the gap, still running at 6 s
        "after",
        "after",  # unfinished, but arrived after the last recovery
        "during",  # never finished: lives to the end of the run, through both windows
        "between",  # arrived at the recovery itself
        "before",  # finished at the very moment the device failed
        "during",  # wholly inside the window
    ]
    starts = np.array([0.5, 2.0, 3.4, 3.5, 6.5, 7.0, 8.0])
    assert [PHASES[k] for k in iteration_phases(starts, [(2.0, 3.5), (6.0, 7.0)])] == [
        "before",
        "during",
        "during",
        "between",
        "during",
        "after",
        "after",
    ]
    assert set(request_phases(arrival, finish, [], end_s=9.0)) == {0}


def test_serving_phases_follow_the_failure_window_not_the_state() -> None:
    """Device 1 fails at 2 s and is back at 3.5 s, and a straggler slows device 0 over
    [4, 4.5): the straggler is its own window and leaves the phases alone; every before
    request finished by 2 s, every during one lived across [2, 3.5), every after one
    arrived from 3.5 s."""
    f = _fail_one("drop")
    f["stragglers"] = [{"device": 0, "slowdown": 2.0, "from_s": 4.0, "until_s": 4.5}]
    system = build_system(scenario_from_dict({**PAIR, "failures": f}))
    rec = simulate_serving_with_failures(system)
    summary = serving_failures_summary(system, rec)
    assert summary["windows"] == [
        {
            "start_s": 2.0,
            "end_s": 3.5,
            "kind": "device_failure",
            "what": "device 1 failed (no spare: repair)",
            "requests": summary["windows"][0]["requests"],
        },
        {
            "start_s": 4.0,
            "end_s": 4.5,
            "kind": "straggler",
            "what": "device 0 x2 slower",
            "requests": summary["windows"][1]["requests"],
        },
    ]
    r = rec.requests
    ph = request_phases(r.arrival_s, r.finish_s, [(2.0, 3.5)], rec.end_s)
    assert np.all(r.finish_s[ph == 0] <= 2.0)
    assert np.all((r.arrival_s[ph == 1] < 3.5) & (r.finish_s[ph == 1] > 2.0))
    assert np.all(r.arrival_s[ph == 3] >= 3.5)
    p = summary["phases"]
    assert [p[n]["requests"] for n in PHASES] == [int((ph == k).sum()) for k in range(4)]
    assert p["before"]["requests"] > 0 and p["during"]["requests"] > 0
    assert p["after"]["requests"] > 0 and p["between"]["requests"] == 0
    # the old rule (by the state at arrival) put requests decoding through 2 s before
    assert np.any((r.arrival_s < 2.0) & (ph == 1))


def test_goodput_counts_slo_meeting_requests_within_the_window() -> None:
    """Goodput = output tokens of measured requests that finished by duration_s meeting
    both targets, per second of [warmup_s, duration_s]: never above the throughput, all
    finished ones without an SLO, none with an unreachable TTFT target."""
    base = {**PAIR, "workload": {**PAIR["workload"], "warmup_s": 0.5}}
    runs = {}
    for name, slo in [("none", None), ("loose", (1e6, 1e6)), ("tight", (1e-3, 1e6))]:
        d = {**base, "failures": _fail_one("drop")}
        if slo is not None:
            d["workload"] = {**base["workload"], "slo": {"ttft_ms": slo[0], "tpot_ms": slo[1]}}
        system = build_system(scenario_from_dict(d))
        rec = simulate_serving_with_failures(system)
        runs[name] = (rec, serving_summary(system, rec), serving_failures_summary(system, rec))
    rec, top, f = runs["none"]
    r = rec.requests
    ok = (r.arrival_s >= 0.5) & (r.finish_s <= 5.0)
    assert f["goodput_requests"] == int(ok.sum()) > 0
    assert f["goodput_tokens_per_s"] == pytest.approx(16 * ok.sum() / 4.5, abs=1e-6)
    assert f["goodput_tokens_per_s"] <= top["throughput_tokens_per_s"]
    assert runs["loose"][2]["goodput_tokens_per_s"] == f["goodput_tokens_per_s"]
    assert "TTFT <= 1e+06 ms" in runs["loose"][2]["goodput_basis"]
    assert runs["tight"][2]["goodput_tokens_per_s"] == 0.0
    # a per-request SLO check by hand: a TTFT target at the median of the run's TTFTs
    ttft = r.first_token_s[ok] - r.arrival_s[ok]
    target_s = float(np.median(ttft))
    d = {**base, "failures": _fail_one("drop")}
    d["workload"] = {**base["workload"], "slo": {"ttft_ms": target_s * 1e3, "tpot_ms": 1e6}}
    system = build_system(scenario_from_dict(d))
    rec = simulate_serving_with_failures(system)
    r = rec.requests
    good = (
        (r.arrival_s >= 0.5) & (r.finish_s <= 5.0) & ((r.first_token_s - r.arrival_s) <= target_s)
    )
    f = serving_failures_summary(system, rec)
    assert 0 < f["goodput_requests"] == int(good.sum()) < int(ok.sum())


def test_events_after_the_run_stopped_do_not_count() -> None:
    """A failure at 4.9 s of a 5 s run, repaired after 100 s: the run drains on the live
    rank long before, so the recovery is not an event of the run and the failure window
    ends when the run does."""
    f = {
        "devices": [{"kind": "scheduled", "device": 1, "at_s": 4.9}],
        "recovery": {"on_expert_loss": "drop", "repair_s": 100.0},
    }
    summary = _serve(f)
    fs = summary["failures"]
    assert summary["simulated_s"] < 10
    assert [e["kind"] for e in fs["events"]] == ["fail"]
    assert fs["device_failures"] == 1
    assert fs["windows"][0]["start_s"] == 4.9
    assert fs["windows"][0]["end_s"] == summary["simulated_s"]


def test_a_second_failure_of_a_dead_device_is_listed_as_ignored() -> None:
    """Device 1 fails at 2 s (back at 3.5 s) and again, scheduled, at 2.5 s while down:
    not a second failure, but listed as ignored rather than dropped."""
    f = _fail_one("drop")
    f["devices"].append({"kind": "scheduled", "device": 1, "at_s": 2.5})
    fs = _serve(f)["failures"]
    assert fs["device_failures"] == 1
    assert {
        "time_s": 2.5,
        "kind": "ignored",
        "device": 1,
        "detail": "ignored: device already down",
    } in fs["events"]


def test_lost_requests_are_reported_as_lost_not_unfinished() -> None:
    """on_rank_loss: lose: the lost requests are counted and printed as lost; the run
    drained, so nothing is unfinished at the 10x cap."""
    lose = _fail_one("drop")
    lose["recovery"]["on_rank_loss"] = "lose"
    summary = _serve(lose)
    assert summary["lost_requests"] == summary["failures"]["lost_requests"] > 0
    assert summary["unfinished_requests"] == 0 and summary["drained"]
    assert summary["completed_requests"] + summary["lost_requests"] == summary["measured_requests"]
    table = serving_table(summary)
    assert f"{summary['lost_requests']} lost with a failed rank" in table
    assert "unfinished" not in table


def test_expected_slot_counts_are_whole_numbers() -> None:
    fs = _serve(_fail_one("replica", replicas=64))["failures"]
    for k, v in fs["moe_slots"].items():
        assert isinstance(v, int), k
    assert (
        "."
        not in failures_lines({"workload": "serving", "failures": fs})
        .split("moe slots")[1]
        .split("\n")[0]
    )


def test_events_past_the_run_are_located_errors(write: Any) -> None:
    """A scheduled failure, link event or straggler starting at or after duration_s
    (serving: 10 s; training: 100 s) would never happen: each is reported at its line."""
    text = SERVE_YAML.replace(
        "  recovery: {on_expert_loss: replica, replicas: 8}",
        "  devices:\n    - {kind: scheduled, device: 1, at_s: 200}\n"
        "  links:\n    - {device: 0, link: scale_up, at_s: 10, bandwidth_fraction: 0.5}\n"
        "  stragglers:\n    - {device: 2, slowdown: 2, from_s: 9.5}",
    )
    errs = _errors(write, text)
    assert len(errs) == 2, errs
    assert ":13:" in errs[0] and errs[0].endswith(
        "failures.devices[0].at_s: the scheduled failure at 200 s starts at or after the end "
        "of the run (workload.duration_s = 10 s): it would never happen; schedule it earlier "
        "or lengthen the run"
    )
    assert ":15:" in errs[1] and "failures.links[0].at_s: the link event at 10 s" in errs[1]
    train = TRAIN_YAML.replace(
        "  checkpoint: {interval_steps: 0}",
        "  devices:\n    - {kind: scheduled, device: 1, at_s: 100}\n  checkpoint: {interval_steps: 5}",
    )
    (err,) = _errors(write, train)
    assert "failures.devices[0].at_s: the scheduled failure at 100 s" in err


def test_a_statically_duplicate_failure_is_a_located_error(write: Any) -> None:
    """The same device scheduled to fail twice at one time, or again after a failure with
    no repair and no spare, is an error; with a repair it depends on the run (ignored)."""
    two = SERVE_YAML.replace(
        "  recovery: {on_expert_loss: replica, replicas: 8}",
        "  devices:\n    - {kind: scheduled, device: 1, at_s: 5}\n"
        "    - {kind: scheduled, device: 2, at_s: 3}\n"
        "    - {kind: scheduled, device: 1, at_s: 2}",
    )
    (err,) = _errors(write, two)
    assert ":13:" in err and err.endswith(
        "failures.devices[0].at_s: device 1 is already down at 5 s: failures.devices[2] "
        "fails it at 2 s and no repair_s or hot spare brings it back"
    )
    same = two.replace("at_s: 2}", "at_s: 5}")
    (err,) = _errors(write, same)
    assert "failures.devices[2].at_s: device 1 is already down at 5 s: failures.devices[0] " in err
    assert err.endswith("at the same time")
    repaired = two + "  recovery: {repair_s: 60}\n"
    assert load_scenario(write("ok.yaml", repaired)).failures is not None


def test_service_availability_is_the_time_not_stalled() -> None:
    """A failure noticed after detect_s stalls every rank until then, and the other ranks
    serve on: service availability = 1 - detect_s / run time (closed form)."""
    import moesim

    s = moesim.load_scenario(
        "scenarios/mixtral-serving-failure-dgx-h100.yaml",
        [
            "workload.duration_s=6",
            "workload.warmup_s=1",
            "failures.devices=[{kind: scheduled, device: 3, at_s: 2}]",
            "failures.links=[]",
            "failures.stragglers=[]",
            "failures.recovery.detect_s=0.5",
            # smaller and shorter requests (the closed form holds for any): quick to run
            "model.layers=4",
            "workload.prompt_tokens={kind: constant, value: 256}",
            "workload.output_tokens={kind: constant, value: 16}",
        ],
    )
    summary = moesim.run(s).summary
    f = summary["failures"]
    assert f["service_availability"] == pytest.approx(1 - 0.5 / summary["simulated_s"], abs=1e-5)
    assert f["service_availability"] > f["full_capacity"]
