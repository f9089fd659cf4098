"""One feasibility definition (moesim.report.feasibility) for sweep, capacity and plan:
constructed cases that must never be feasible, and the reason each one prints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_capacity import SCENARIO

from moesim.config.sweep import Bound
from moesim.report.feasibility import KEEP_UP, judge
from moesim.sweep import run_sweep

#: the capacity tests' small serving scenario (two H200s, four Mixtral layers, 1.5 s
#: window) with an SLO no latency breaks
SERVING = SCENARIO.replace(
    "slo: {ttft_ms: 60, tpot_ms: 8}", "slo: {ttft_ms: 60000, tpot_ms: 60000}"
)
assert SERVING != SCENARIO

TRAINING = """\
name: feas-training
seed: 3
cluster: dgx-h100
model: {preset: mixtral-8x7b, layers: 2}
routing: {kind: uniform}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop}
workload: {kind: training, seq_len: 4096, micro_batch_sequences: 1, microbatches: 1}
"""


def _sweep(
    tmp_path: Path, base: str, grid: str, constraints: str = "", metrics: str = "devices"
) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    f = tmp_path / "sweep.yaml"
    f.write_text(
        f"name: s\nbase: base.yaml\ngrid:\n{grid}\nmetrics: [{metrics}]\n{constraints}"
        f"output_dir: {tmp_path / 'out'}\nworkers: 1\n"
    )
    return f


def test_an_overloaded_serving_point_is_never_feasible(tmp_path: Path) -> None:
    """A point offered ten times what it serves meets a loose latency bound and has no
    constraint it breaks, yet is infeasible: it falls behind (keep-up rule), and says so
    in the table, results.csv and sweep.json."""
    f = _sweep(
        tmp_path,
        SERVING,
        "  workload.arrival.rate_per_s: [100, 20000]\n",
        "constraints: {ttft_ms.p99: {max: 1.0e+9}}\n",
        "ttft_ms.p99",
    )
    r = run_sweep(f)
    assert r.feasible == [True, False]
    assert r.reasons[0] == "feasible"
    assert "falls behind" in r.reasons[1] and "steady-state window" in r.reasons[1]
    rows = list(csv.DictReader((r.folder / "results.csv").open()))
    assert [row["feasible"] for row in rows] == ["True", "False"]
    assert rows[1]["reason"] == r.reasons[1]
    assert rows[0]["workload.arrival.rate_per_s"] == "100"


def test_a_training_layout_out_of_memory_is_never_feasible(tmp_path: Path) -> None:
    """A training layout whose stage-0 device needs more than its 80 GiB runs (the summary
    says memory_fits: false) but is infeasible with the sizes; the fitting one is feasible."""
    f = _sweep(tmp_path, TRAINING, "  workload.micro_batch_sequences: [1, 64]\n")
    r = run_sweep(f)
    assert r.feasible == [True, False]
    assert r.reasons[1].startswith("out of memory: a device needs ")
    need = float(r.reasons[1].split("needs ")[1].split(" GiB")[0])
    assert need > 80


def test_sweep_csv_has_flat_columns(tmp_path: Path) -> None:
    """A mapping varied by a sweep becomes one column per field, never JSON in a cell."""
    f = _sweep(
        tmp_path,
        TRAINING,
        "  parallelism: [{dp: 8, ep: 8}, {dp: 4, tp: 2, ep: 8}]\n",
    )
    r = run_sweep(f)
    text = (r.folder / "results.csv").read_text()
    head = text.splitlines()[0].split(",")
    assert {"parallelism.dp", "parallelism.ep", "parallelism.tp"} <= set(head)
    assert "{" not in text and '"' not in text


def test_judge_rules_on_constructed_summaries() -> None:
    """Each rule fails alone with its own reason; a failed run is infeasible with its error."""
    ok = {
        "workload": "serving",
        "steady_state": {"start_s": 10.0, "end_s": 60.0, "keep_up": 0.99},
        "drained": True,
        "slo_attainment": {"both": 1.0},
        "window_completed_requests": 500,
        "ttft_ms": {"p99": 100.0},
    }
    assert judge(ok, target=0.99).feasible
    behind = {**ok, "steady_state": {**ok["steady_state"], "keep_up": KEEP_UP - 0.01}}
    (why,) = judge(behind, target=0.99).reasons
    assert why.startswith("falls behind: serves 94% of the offered load over the steady-state")
    assert "KV cache" not in why
    # behind with the KV cache full: memory is named as the limit
    starved = {**behind, "kv_cache_utilization": {"mean": 0.93, "max": 1.0}}
    (why,) = judge(starved).reasons
    assert why.endswith(
        "the KV cache is the limit (on average 93% full): more memory per "
        "device, a larger tp or more devices"
    )
    assert judge({**ok, "kv_cache_utilization": {"mean": 0.99}}).feasible
    assert judge({**ok, "drained": False}).reasons == ("not drained by the end of the run",)
    slow = judge(ok, constraints={"ttft_ms.p99": Bound(max=50)})
    assert slow.reasons == ("ttft_ms.p99 = 100 > 50",)
    missing = judge(ok, constraints={"tpot_ms.p99": Bound(max=50)})
    assert missing.reasons == ("tpot_ms.p99 not measured",)
    assert judge(None, error="weights do not fit").reason == "failed: weights do not fit"
    oom = {
        "workload": "training",
        "memory_fits": False,
        "memory_gib": {"total": 202, "capacity": 79.6},
    }
    assert judge(oom).reasons == ("out of memory: a device needs 202.0 GiB of 79.6 GiB",)


@pytest.mark.parametrize("keep", [0.5, 0.94])
def test_capacity_and_sweep_agree(keep: float) -> None:
    """The capacity search's rule is the sweep's rule with a target."""
    from moesim.sweep.capacity import why_infeasible

    s = {
        "workload": "serving",
        "steady_state": {"start_s": 1.0, "end_s": 2.0, "keep_up": keep},
        "drained": True,
        "slo_attainment": {"both": 1.0},
        "window_completed_requests": 500,
    }
    assert why_infeasible(s, 0.99) == list(judge(s, target=0.99).reasons)
    assert not judge(s).feasible


def test_a_short_window_is_named_in_the_keep_up_reason() -> None:
    """Issue 14's capacity trap: 100% within the SLO but behind the load on a window
    shorter than the ramp: the reason names the rule, the window and the remedy."""
    s = {
        "workload": "serving",
        "steady_state": {"start_s": 4.0, "end_s": 8.0, "keep_up": 0.94},
        "e2e_ms": {"p50": 3000.0},
        "drained": True,
        "slo_attainment": {"both": 1.0},
        "window_completed_requests": 500,
    }
    (why,) = judge(s, target=0.99).reasons
    assert why.startswith("falls behind: serves 94% of the offered load over the steady-state")
    assert "(keep-up rule: >= 95%)" in why and "lengthen workload.duration_s" in why
    long = {**s, "steady_state": {**s["steady_state"], "start_s": 1.0, "end_s": 60.0}}
    assert "lengthen" not in judge(long, target=0.99).reason
    far = {**s, "steady_state": {**s["steady_state"], "keep_up": 0.4}}
    assert "lengthen" not in judge(far, target=0.99).reason  # overloaded: no window hint
