"""Serving engines as presets: located errors, defaults under the scenario's fields, the
host-cost model in closed form, and the ideal engine leaving today's figures unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.api import run
from moesim.errors import ScenarioError
from moesim.loader import scenario_from_dict

ONE_GPU: dict[str, Any] = {
    "name": "eng",
    "seed": 3,
    "cluster": "single-h100",
    "model": "olmoe-1b-7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 1, "ep": 1},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
}

#: a closed system: every request arrives at once and decodes in lock-step (one batch of
#: BATCH sequences, PROMPT-token prompts prefilled in the first iteration, OUT tokens each)
BATCH, PROMPT, OUT = 8, 32, 64


def _constant(engine: Any = None, **scheduler: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "kind": "serving",
        "duration_s": 1.0,
        "arrival": {
            "kind": "trace",
            "arrival_s": [0.0] * BATCH,
            "prompt_tokens": [PROMPT] * BATCH,
            "output_tokens": [OUT] * BATCH,
        },
    }
    if engine is not None:
        w["engine"] = engine
    if scheduler:
        w["scheduler"] = scheduler
    return {**ONE_GPU, "workload": w}


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    return run(scenario_from_dict(data)).summary


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(data)
    return [f"{i.path}: {i.message}" for i in err.value.issues]


def test_unknown_engine_is_a_located_error() -> None:
    """An engine name the catalog lacks is reported at workload.engine with the choices."""
    (msg,) = _errors(_constant("vllm-99"))
    assert msg.startswith("workload.engine: unknown engine preset 'vllm-99'")
    assert "ideal" in msg


def test_a_field_an_engine_lacks_is_a_located_error() -> None:
    """A misspelt engine field is reported at its path, not ignored."""
    msgs = _errors(_constant({"preset": "ideal", "host": {"fixed_ms": 3}}))
    assert any(m.startswith("workload.engine.host.fixed_ms") for m in msgs), msgs


def test_serving_defaults_to_the_ideal_engine() -> None:
    """A serving scenario without an engine runs the ideal one, stated in the resolved
    scenario, and its summary equals the one with ``engine: ideal`` written out."""
    implicit = scenario_from_dict(_constant())
    assert implicit.workload.engine.name == "ideal"  # type: ignore[union-attr]
    assert implicit.workload.engine.host.zero  # type: ignore[union-attr]
    assert _summary(_constant()) | {"wall_s": 0} == _summary(_constant("ideal")) | {"wall_s": 0}
    assert "engine" not in _summary(_constant())  # the kernel-bound default adds nothing


def test_engine_scheduler_defaults_sit_under_the_scenario_fields() -> None:
    """An engine's scheduler defaults apply where the scenario sets nothing; a scenario
    field wins over the engine's."""
    engine = {"preset": "ideal", "scheduler": {"max_seqs": 4, "block_tokens": 32}}
    s = scenario_from_dict(_constant(engine, max_seqs=2))
    sched = s.workload.scheduler  # type: ignore[union-attr]
    assert (sched.max_seqs, sched.block_tokens) == (2, 32)


def test_engine_launch_mode_is_a_default_the_scenario_may_override() -> None:
    """The engine's launch mode replaces the cluster preset's, not one the user wrote."""
    engine = {"preset": "ideal", "launch": "graph"}
    assert scenario_from_dict(_constant(engine)).cluster.launch == "graph"
    mine = {**_constant(engine), "cluster": {"preset": "single-h100", "launch": "eager"}}
    assert scenario_from_dict(mine).cluster.launch == "eager"


@pytest.mark.parametrize("overlap", [False, True])
def test_host_cost_in_closed_form_on_a_constant_workload(overlap: bool) -> None:
    """With a fixed batch and fixed lengths, every decode iteration costs the ideal
    iteration plus the fitted host time (or the larger of the two when host work overlaps
    the device's), so TPOT moves by exactly that."""
    host = {"fixed_us": 2000.0, "per_layer_us": 30.0, "per_sequence_us": 50.0, "overlap": overlap}
    layers = scenario_from_dict(_constant()).model.layers
    host_s = (2000.0 + 30.0 * layers + 50.0 * BATCH) * 1e-6
    ideal = _summary(_constant())
    real = _summary(_constant({"preset": "ideal", "name": "slow-host", "host": host}))
    tpot0, tpot1 = ideal["tpot_ms"]["p50"] / 1e3, real["tpot_ms"]["p50"] / 1e3
    expected = max(tpot0, host_s) if overlap else tpot0 + host_s
    assert tpot1 == pytest.approx(expected, rel=1e-6)
    assert real["engine"] == "slow-host"
    host_total = real["time_breakdown_s"]["host"]
    iterations = real["iterations"]
    assert host_total == pytest.approx(iterations * max(0.0, expected - tpot0), rel=1e-3)


def test_an_engine_measured_elsewhere_says_it_extrapolates() -> None:
    """An engine measured on another device or model notes the extrapolation."""
    engine = {
        "preset": "ideal",
        "host": {"fixed_us": 100.0},
        "measured_on": ["h200-sxm/mixtral-8x7b"],
    }
    notes = _summary(_constant(engine))["notes"]
    assert any("extrapolated to" in n and "h200-sxm/mixtral-8x7b" in n for n in notes), notes


def test_packed_attention_grows_with_the_square_of_the_batch() -> None:
    """transformers' packed SDPA scores every query against every gathered key of the
    batch: a decode step of B sequences at context C costs B x B.C pairs, so once that is
    compute-bound its time grows ~B^2 where the fused kernel's grows ~B (memory-bound: each
    sequence's own KV); it is never cheaper than fused."""
    from moesim.cost.attention import AttentionCost
    from moesim.system import build_system

    system = build_system(scenario_from_dict(_constant()))
    rf, model = system.layer_costs.roofline, system.scenario.model
    fused, packed = AttentionCost(rf, model, 1), AttentionCost(rf, model, 1, "packed")
    c = 2048

    def step(cost: AttentionCost, b: int) -> float:
        return float(cost.scores_s(b, b * c, b * c))

    for b in (1, 16, 256):
        assert step(packed, b) >= step(fused, b)
    assert step(packed, 4096) / step(packed, 2048) == pytest.approx(4.0, rel=0.1)
    assert step(fused, 4096) / step(fused, 2048) == pytest.approx(2.0, rel=0.05)


def test_admission_waits_while_the_cache_is_nearly_full() -> None:
    """With ``admit_free_fraction`` a waiting prompt is not admitted beside running ones
    once fewer blocks than that share are free; without it, it is."""
    from moesim.config.serving import SchedulerConfig
    from moesim.engine.batching import RankScheduler, RequestState

    def admitted(fraction: float) -> list[int]:
        state = RequestState([0.0, 0.0], [100, 16], [50, 4])
        cfg = SchedulerConfig(block_tokens=16, admit_free_fraction=fraction)
        ranks = RankScheduler(state, cfg, total_blocks=10)
        ranks.waiting.extend([0, 1])
        return ranks.schedule(0.0).ids

    assert admitted(0.0) == [0, 1]  # 7 + 1 blocks of 10
    assert admitted(0.5) == [0]  # after request 0, 3 of 10 blocks free < 5


@pytest.mark.parametrize(("requeue", "expected"), [("front", [1, 0]), ("back", [0, 1])])
def test_a_preempted_request_waits_where_its_engine_puts_it(requeue: str, expected: list) -> None:
    """vLLM puts a preempted request first in line again; transformers last."""
    from moesim.config.serving import SchedulerConfig
    from moesim.engine.batching import RankScheduler, RequestState

    state = RequestState([0.0, 0.0, 0.0], [16, 16, 16], [64, 64, 64])
    ranks = RankScheduler(state, SchedulerConfig(block_tokens=16, requeue=requeue), 3)
    ranks.waiting.append(0)
    ranks.running = [2, 1]
    state.computed[1] = state.computed[2] = 16
    state.blocks[1] = state.blocks[2] = 1
    ranks.free_blocks = 1
    state.generated[1] = state.generated[2] = 1  # both need a second block
    ranks.schedule(0.0)
    assert list(ranks.waiting) == expected


MEASURED = "moesim/catalog/measurements/h200_hf_transformers_5.17_serving_online.jsonl"
HELD_OUT = ("r0.5-p600-o128", "r2-p600-o128", "r4-p600-o128", "h1.5-p200-o256", "h3.5-p200-o256")


def test_hf_transformers_engine_is_selected_by_name() -> None:
    """``workload.engine: hf-transformers-5.17`` selects the measured engine: eager launches,
    packed attention, its FIFO scheduler's defaults and a host cost."""
    s = scenario_from_dict(_constant("hf-transformers-5.17"))
    engine = s.workload.engine  # type: ignore[union-attr]
    assert (engine.name, engine.attention, s.cluster.launch) == (
        "hf-transformers-5.17",
        "packed",
        "eager",
    )
    sched = s.workload.scheduler  # type: ignore[union-attr]
    assert (sched.block_tokens, sched.admit_free_fraction, sched.requeue) == (256, 0.15, "back")
    assert engine.host.fixed_us > 0 and engine.fit is not None


def test_hf_transformers_engine_on_held_out_runs() -> None:
    """Validation against measurements (docs/fidelity.md, Serving engines; transformers
    5.17.0 on one H200, 2026-12-03): on the online runs held out of the fit the shipped
    engine predicts TPOT p50 within 30% and TTFT p50 within 20% (measured: -5..+27% and
    -3..+18%), where the kernel-bound ideal engine is over 60% too fast."""
    from pathlib import Path

    from moesim.calibrate import records
    from moesim.calibrate.serving_fidelity import replay

    root = Path(__file__).resolve().parent.parent
    recs = [
        r
        for r in records.read(root / MEASURED)
        if r.get("kind") == "env" or r.get("run") in HELD_OUT
    ]
    real = {r["run"]: r for r in replay(recs, "hf-transformers-5.17")}
    ideal = {r["run"]: r for r in replay(recs, "ideal")}
    assert sorted(real) == sorted(HELD_OUT)
    for name, row in real.items():
        m, p = row["measured"], row["predicted"]
        assert abs(p["tpot_p50"] / m["tpot_p50"] - 1) < 0.30, name
        assert abs(p["ttft_p50"] / m["ttft_p50"] - 1) < 0.20, name
        assert ideal[name]["predicted"]["tpot_p50"] < 0.4 * m["tpot_p50"], name


def test_host_time_leaves_the_device_idle_in_the_energy_account() -> None:
    """The engine's host-side time is device idle time: a slow host adds its whole host
    time to the idle device-seconds and none to the busy states."""
    host = {"fixed_us": 20000.0}
    ideal = _summary(_constant())["energy"]["device_seconds_by_state"]
    slow = _summary(_constant({"preset": "ideal", "name": "slow", "host": host}))
    busy = ("compute", "memory", "communicating")
    assert sum(slow["energy"]["device_seconds_by_state"][k] for k in busy) == pytest.approx(
        sum(ideal[k] for k in busy), rel=1e-6
    )
    # one device: idle is the run's whole span less the (unchanged) busy seconds
    idle = slow["energy"]["device_seconds_by_state"]["idle"]
    assert idle >= slow["time_breakdown_s"]["host"]


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_output_lag_in_closed_form_on_a_constant_workload(lag: int) -> None:
    """A pipelined host loop (async batching) reads a step's tokens ``lag`` steps later.
    With the host's fixed cost hiding every device iteration (overlap), each step takes
    exactly that cost H: TTFT = (1 + lag) H, TPOT = H (both ends move alike) and E2E =
    (OUT + lag) H (after the last step the engine re-runs the same requests, again H)."""
    host_s = 0.05
    engine = {
        "preset": "ideal",
        "name": "piped",
        "host": {"fixed_us": host_s * 1e6, "overlap": True},
        "output_lag_iterations": lag,
    }
    s = _summary(_constant(engine))
    assert s["ttft_ms"]["p50"] == pytest.approx((1 + lag) * host_s * 1e3, rel=1e-9)
    assert s["tpot_ms"]["p50"] == pytest.approx(host_s * 1e3, rel=1e-9)
    assert s["e2e_ms"]["p50"] == pytest.approx((OUT + lag) * host_s * 1e3, rel=1e-9)
    assert s["iterations"] == OUT  # the lag moves records, not the work


def test_lagged_times_follow_the_next_step_or_repeat_the_last() -> None:
    """A token's time moves to the end of the step after its own when one follows at once;
    after an idle gap the lagged step lasts as long as the token's own."""
    from moesim.engine.serving import lagged_times

    start = np.array([0.0, 1.0, 3.0, 5.0])
    dur = np.array([1.0, 0.5, 2.0, 1.0])  # steps end at 1, 1.5, 5, 6 (idle 1.5 .. 3)
    times = np.array([1.0, 1.5, 5.0, 6.0, np.nan])
    assert lagged_times(times, start, dur, 0).tolist()[:4] == [1.0, 1.5, 5.0, 6.0]
    one = lagged_times(times, start, dur, 1)
    assert one[:4].tolist() == [1.5, 2.0, 6.0, 7.0] and np.isnan(one[4])
    assert lagged_times(times, start, dur, 2)[:4].tolist() == [2.0, 2.5, 7.0, 8.0]


ASYNC = "moesim/catalog/measurements/h200_hf_transformers_5.17_async_serving_online.jsonl"
ASYNC_HELD_OUT = ("s2-p600-o128", "s4-p600-o128", "sh3.5-p200-o256")


def test_hf_transformers_async_engine_on_held_out_runs() -> None:
    """Validation against measurements (docs/fidelity.md, Serving engines; transformers
    5.17.0 with async batching on one H200, 2026-12-03): on the runs held out of the fit
    the shipped async engine predicts TPOT p50 within 10% and TTFT p50 within 20%
    (measured: -7..-2% and -16..-1%); without its output lag (the mechanism) TTFT comes
    out over 35% short."""
    from pathlib import Path

    from moesim.calibrate import records
    from moesim.calibrate.serving_fidelity import replay

    root = Path(__file__).resolve().parent.parent
    recs = [
        r
        for r in records.read(root / ASYNC)
        if r.get("kind") == "env" or r.get("run") in ASYNC_HELD_OUT
    ]
    name = "hf-transformers-5.17-async"
    real = {r["run"]: r for r in replay(recs, name)}
    unlagged = {r["run"]: r for r in replay(recs, {"preset": name, "output_lag_iterations": 0})}
    assert sorted(real) == sorted(ASYNC_HELD_OUT)
    for run_id, row in real.items():
        m, p = row["measured"], row["predicted"]
        assert abs(p["tpot_p50"] / m["tpot_p50"] - 1) < 0.10, run_id
        assert abs(p["ttft_p50"] / m["ttft_p50"] - 1) < 0.20, run_id
        assert abs(p["throughput"] / m["throughput"] - 1) < 0.10, run_id
        assert unlagged[run_id]["predicted"]["ttft_p50"] < 0.65 * m["ttft_p50"], run_id


def test_graphed_decode_steps_skip_the_per_layer_dispatch() -> None:
    """An engine that replays decode steps as CUDA graphs (``graph_decode``) pays its
    per-layer dispatch only in steps carrying prompt tokens: on a constant workload TPOT
    is the ideal one plus the fixed cost alone, and TTFT (the prefill step) carries the
    fixed cost plus every layer's dispatch."""
    layers = scenario_from_dict(_constant()).model.layers
    fixed_us, per_layer_us = 300.0, 40.0
    host = {"fixed_us": fixed_us, "per_layer_us": per_layer_us, "graph_decode": True}
    ideal = _summary(_constant())
    graphed = _summary(_constant({"preset": "ideal", "name": "graphed", "host": host}))
    eager = _summary(
        _constant({"preset": "ideal", "name": "eager", "host": {**host, "graph_decode": False}})
    )
    tpot0, ttft0 = ideal["tpot_ms"]["p50"], ideal["ttft_ms"]["p50"]
    assert graphed["tpot_ms"]["p50"] == pytest.approx(tpot0 + fixed_us / 1e3, rel=1e-9)
    assert eager["tpot_ms"]["p50"] == pytest.approx(
        tpot0 + (fixed_us + per_layer_us * layers) / 1e3, rel=1e-9
    )
    for s in (graphed, eager):
        assert s["ttft_ms"]["p50"] == pytest.approx(
            ttft0 + (fixed_us + per_layer_us * layers) / 1e3, rel=1e-9
        )


def test_each_prompt_pays_its_own_dispatch_in_the_step_that_prefills_it() -> None:
    """``per_prompt_layer_us``: a step prefilling p prompts pays p x layers x the term on
    top of its other host costs; decode steps pay nothing of it. On the constant workload
    (all BATCH prompts prefilled in the first step, whole) TTFT grows by exactly BATCH x
    layers x the term, TPOT not at all; with the term 0 nothing changes to the last bit."""
    layers = scenario_from_dict(_constant()).model.layers
    host = {"fixed_us": 300.0, "per_layer_us": 40.0, "graph_decode": True}
    budget = BATCH * PROMPT

    def summary(per: float | None) -> dict[str, Any]:
        h = host if per is None else {**host, "per_prompt_layer_us": per}
        engine = {"preset": "ideal", "name": "graphed", "host": h}
        return _summary(_constant(engine, max_batch_tokens=budget))

    base, per = summary(None), 25.0
    assert summary(0.0) == base
    prompted = summary(per)
    assert prompted["tpot_ms"]["p50"] == pytest.approx(base["tpot_ms"]["p50"], rel=1e-12)
    assert prompted["ttft_ms"]["p50"] == pytest.approx(
        base["ttft_ms"]["p50"] + BATCH * layers * per / 1e3, rel=1e-9
    )
    # a prompt length new to the process: its set-up once (all BATCH prompts share one
    # length), none where the engine ran that length before
    first_us = 40_000.0
    for warm, extra in (((), first_us), ((PROMPT,), 0.0), ((PROMPT + 1,), first_us)):
        h = {**host, "first_prompt_length_us": first_us}
        engine = {"preset": "ideal", "name": "graphed", "host": h, "warm_prompt_lengths": warm}
        cold = _summary(_constant(engine, max_batch_tokens=budget))
        assert cold["ttft_ms"]["p50"] == pytest.approx(
            base["ttft_ms"]["p50"] + extra / 1e3, rel=1e-9
        ), warm
        assert cold["tpot_ms"]["p50"] == pytest.approx(base["tpot_ms"]["p50"], rel=1e-12)


LEAN = "moesim/catalog/measurements/h200_lean_torch_cudagraph_serving_online_2026-12-03.jsonl"
LEAN_HELD_OUT = (
    "l4-p600-o128",
    "l12-p600-o128",
    "l24-p600-o128",
    "lh6-p200-o256",
    "lh14-p200-o256",
)


@pytest.mark.slow
def test_lean_engine_on_held_out_runs() -> None:
    """Validation against measurements (docs/fidelity.md; the lean engine on one H200,
    2026-12-03): on the runs held out of the fit the shipped preset predicts TPOT p50 within
    10% and throughput within 10% (measured: -4..+7%, -4..+0%), where the ideal engine is
    over 15% too fast; and this fast engine's TPOT stays under 70% of transformers'
    fastest even at 24 requests/s. TTFT p50 within 20% (measured: -20..+16%) needs the
    engine's set-up of each new prompt length (``first_prompt_length_us``; the replay
    gives each run the lengths the process ran before it): the preset fitted without it
    gave -43..+37%, this one with it set to 0 gives -63..-19%."""
    from pathlib import Path

    from moesim.calibrate import records
    from moesim.calibrate.serving_fidelity import replay

    root = Path(__file__).resolve().parent.parent
    recs = records.read(root / LEAN)  # all runs: the earlier ones warm prompt lengths
    real = {r["run"]: r for r in replay(recs, "lean-torch-cudagraph-h200", only=LEAN_HELD_OUT)}
    ideal = {r["run"]: r for r in replay(recs, "ideal", only=LEAN_HELD_OUT)}
    assert sorted(real) == sorted(LEAN_HELD_OUT)
    for run_id, row in real.items():
        m, p = row["measured"], row["predicted"]
        assert abs(p["tpot_p50"] / m["tpot_p50"] - 1) < 0.10, run_id
        assert abs(p["throughput"] / m["throughput"] - 1) < 0.10, run_id
        assert abs(p["ttft_p50"] / m["ttft_p50"] - 1) < 0.20, run_id
        assert ideal[run_id]["predicted"]["tpot_p50"] < 0.85 * m["tpot_p50"], run_id
        assert m["tpot_p50"] < 0.7 * 0.105  # transformers' fastest TPOT p50 measured: 105 ms
