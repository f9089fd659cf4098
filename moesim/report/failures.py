"""The ``failures`` section of a summary, and the failure timeline as trace events.

Serving (pure functions of :class:`moesim.engine.serving.ServingRecords`):

- ``availability``: time-average share of devices up over the run; ``full_capacity``:
  share of the time with every device up;
- ``phases``: the measured requests by the failure state at their arrival: ``before``
  the first event, ``during`` an event (any device dead, slow or with degraded links),
  ``after`` (healthy again after an event), with TTFT / TPOT / E2E percentiles and the
  iteration times (by the state at the iteration's start) of each;
- MoE token-choice slots (expected, summed over iterations and MoE layers) sent to a
  replica, rerouted to a next choice, or dropped because their expert was dead;
- requests requeued from a failed rank (their KV recomputed) or lost with it;
- ``goodput_tokens_per_s``: output tokens of finished requests over the simulated time.

Training: the run's time split (train, checkpoint, lost, down, restart), availability
(time the job was working / wall time), goodput (useful steps x step time / wall time),
work lost, and the closed forms of :mod:`moesim.engine.training_run` next to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.engine.failures import FailurePlan, ServingFailureRecords
from moesim.engine.serving import ServingRecords
from moesim.engine.training_run import TrainingRunRecords, expected
from moesim.report.serving import _r, _stats_ms, latencies_s, measured_mask
from moesim.system import System


def _events(plan: FailurePlan) -> list[dict[str, Any]]:
    return [
        {"time_s": _r(e.time_s), "kind": e.kind, "device": e.device, "detail": e.detail}
        for e in plan.events
    ]


def _availability(plan: FailurePlan, devices: int, end_s: float) -> tuple[float, float]:
    up = full = 0.0
    for a, b, st in plan.spans():
        b = min(b, end_s)
        if b <= a:
            continue
        up += (b - a) * (devices - len(st.dead)) / devices
        full += (b - a) * (not st.dead)
    return (up / end_s, full / end_s) if end_s > 0 else (1.0, 1.0)


def _phase_of(plan: FailurePlan, t: np.ndarray) -> np.ndarray:
    """0 before any event, 1 during one, 2 after (healthy again); per time."""
    idx = np.searchsorted(np.asarray(plan.starts), t, side="right") - 1
    healthy = np.array([st.healthy for st in plan.states])
    first_bad = next((i for i, st in enumerate(plan.states) if not st.healthy), None)
    if first_bad is None:
        return np.zeros(len(t), dtype=np.int64)
    return np.where(~healthy[idx], 1, np.where(idx < first_bad, 0, 2)).astype(np.int64)


def serving_failures_summary(system: System, rec: ServingRecords) -> dict[str, Any]:
    """The ``failures`` section of a serving summary."""
    f = rec.failures
    assert f is not None
    s = system.scenario
    w = s.workload
    assert isinstance(w, ServingWorkload)
    plan = f.plan
    devices = len(system.topology.devices)
    avail, full = _availability(plan, devices, rec.end_s)
    r, it = rec.requests, rec.iterations
    mask = measured_mask(rec, w.warmup_s)
    lat = latencies_s(rec)
    req_phase = _phase_of(plan, r.arrival_s)
    it_phase = _phase_of(plan, it.start_s)
    phases: dict[str, Any] = {}
    for k, name in enumerate(("before", "during", "after")):
        m = mask & (req_phase == k)
        iters = it_phase == k
        phases[name] = {
            "requests": int(m.sum()),
            "completed": int((m & np.isfinite(r.finish_s)).sum()),
            "ttft_ms": _stats_ms(lat["ttft"][m]),
            "tpot_ms": _stats_ms(lat["tpot"][m]),
            "e2e_ms": _stats_ms(lat["e2e"][m]),
            "iterations": int(iters.sum()),
            "iteration_ms": _stats_ms(it.duration_s[iters]),
        }
    slots = it.batch_tokens.astype(float) * f.top_k * f.moe_layers
    done = np.isfinite(r.finish_s)
    return {
        "events": _events(plan),
        "device_failures": plan.device_failures,
        "states": [
            {"from_s": _r(a), "until_s": _r(min(b, rec.end_s)), "state": st.describe()}
            for a, b, st in plan.spans()
            if a < rec.end_s
        ],
        "availability": _r(avail),
        "full_capacity": _r(full),
        "recovery": s.failures.recovery.on_expert_loss if s.failures else None,
        "replicas": _replica_count(system),
        "moe_slots": {
            "failed_over": _r(float((slots * f.failed_over_fraction).sum()), 1),
            "rerouted": _r(float((slots * f.rerouted_fraction).sum()), 1),
            "dropped_lost_expert": _r(float((slots * f.lost_fraction).sum()), 1),
            "total": _r(float(slots.sum()), 1),
        },
        "requeued_requests": f.requeued,
        "requeue_recomputed_tokens": f.requeue_recomputed_tokens,
        "lost_requests": int(f.lost_requests.sum()),
        "goodput_tokens_per_s": _r(float(r.output_tokens[done].sum()) / rec.end_s)
        if rec.end_s > 0
        else None,
        "phases": phases,
    }


def _replica_count(system: System) -> int:
    from moesim.derived.replica_memory import replica_experts

    return len(replica_experts(system.scenario))


def training_failures_summary(
    system: System, w: TrainingWorkload, run: TrainingRunRecords
) -> dict[str, Any]:
    """The ``failures`` section of a training summary (a run of ``w.duration_s``)."""
    s = system.scenario
    wall = run.duration_s
    working = run.compute_s + run.checkpoint_total_s
    plan = run.plan
    closed = (
        expected(
            s.failures,
            len(system.topology.devices),
            run.step_s,
            run.interval_steps,
            run.checkpoint_s,
        )
        if s.failures is not None
        else {}
    )
    useful_s = run.useful_steps * run.step_s
    return {
        "events": _events(plan) if plan is not None else [],
        "device_failures": plan.device_failures if plan is not None else 0,
        "run_s": _r(wall),
        "step_s": _r(run.step_s),
        "checkpoint": {
            "bytes": run.checkpoint_bytes,
            "write_s": _r(run.checkpoint_s),
            "interval_steps": run.interval_steps,
            "interval_s": _r(run.interval_steps * run.step_s)
            if run.interval_steps is not None
            else None,
            "count": run.checkpoints,
        },
        "interruptions": run.interruptions,
        "useful_steps": run.useful_steps,
        "computed_steps": run.computed_steps,
        "lost_steps": run.lost_steps,
        "time_s": {
            "train": _r(run.compute_s),
            "checkpoint": _r(run.checkpoint_total_s),
            "down": _r(run.down_s),
            "restart": _r(run.restart_s),
            "lost_work": _r(run.lost_s),
        },
        "availability": _r(working / wall) if wall > 0 else None,
        "goodput_fraction": _r(useful_s / wall) if wall > 0 else None,
        "goodput_tokens_per_s": _r(run.useful_steps * run.tokens_per_step / wall)
        if wall > 0
        else None,
        "work_lost_fraction": _r(run.lost_s / wall) if wall > 0 else None,
        "expected": {k: _r(v) if v is not None else None for k, v in closed.items()},
        "expected_covers": "the random (exponential / Weibull) failure processes only; "
        "scheduled failures, stragglers and link events are in the simulation alone; "
        "the downtime assumes a free spare when hot_spares > 0 (else the repair) and the "
        "renewal formula exponential failures",
    }


def serving_failure_trace(
    f: ServingFailureRecords, iter_start: np.ndarray, iter_s: np.ndarray, devices: tuple[str, ...]
) -> dict[str, Any]:
    """A serving run with failures as a trace: iterations, failure states and events."""
    from moesim.report.trace import failure_events

    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "server"}}
    ]
    for a, d in zip(iter_start, iter_s):
        events.append(
            {"ph": "X", "pid": 0, "tid": 0, "name": "iteration", "ts": a * 1e6, "dur": d * 1e6}
        )
    events += failure_events(f.plan, devices, pid=1)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def training_failure_trace(run: TrainingRunRecords, devices: tuple[str, ...]) -> dict[str, Any]:
    """A training run as a trace: train, checkpoint, lost, down and restart spans, and the
    failure events."""
    from moesim.report.trace import failure_events

    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "training job"}}
    ]
    for sp in run.spans:
        events.append(
            {
                "ph": "X",
                "pid": 0,
                "tid": 0,
                "name": sp.kind,
                "cat": sp.kind,
                "ts": sp.start_s * 1e6,
                "dur": (sp.end_s - sp.start_s) * 1e6,
                "args": {"detail": sp.detail} if sp.detail else {},
            }
        )
    if run.plan is not None:
        events += failure_events(run.plan, devices, pid=1)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def failures_lines(summary: dict[str, Any]) -> str:
    """The ``failures`` section as a few lines under the run's table ('' when absent)."""
    f = summary.get("failures")
    if not f:
        return ""
    events = f.get("events", [])
    shown = "; ".join(
        f"{e['time_s']:.1f} s {e['kind']} {e['device']}"
        + (f" ({e['detail']})" if e["detail"] else "")
        for e in events[:6]
    ) + (f"; ... {len(events) - 6} more" if len(events) > 6 else "")
    if summary.get("workload") == "serving":
        ph = f["phases"]
        names = ("before", "during", "after")

        def row(key: str, stat: str) -> str:
            return "/".join(_num(ph[n][key][stat]) for n in names)

        slots = f["moe_slots"]
        return "\n".join(
            [
                f"failures         {f['device_failures']} device failure(s); availability "
                f"{_pct(f['availability'])} (all devices up {_pct(f['full_capacity'])}); "
                f"recovery {f['recovery']} ({f['replicas']} replicas)",
                f"  events         {shown or 'none'}",
                f"  moe slots      failed over {_num(slots['failed_over'], '.0f')}, rerouted "
                f"{_num(slots['rerouted'], '.0f')}, dropped (dead expert) "
                f"{_num(slots['dropped_lost_expert'], '.0f')} of {_num(slots['total'], '.0f')}",
                f"  requests       {f['requeued_requests']} requeued "
                f"({f['requeue_recomputed_tokens']} tokens recomputed), "
                f"{f['lost_requests']} lost",
                "  before/during/after  requests "
                + "/".join(str(ph[n]["requests"]) for n in names)
                + f"  TTFT p99 {row('ttft_ms', 'p99')} ms  TPOT p50 {row('tpot_ms', 'p50')} ms"
                f"  iteration mean {row('iteration_ms', 'mean')} ms",
            ]
        )
    t, ck, ex = f["time_s"], f["checkpoint"], f["expected"]
    mtbf = ex.get("job_mtbf_s")
    return "\n".join(
        [
            f"failures         {f['interruptions']} interruption(s) from {f['device_failures']} "
            f"device failure(s); availability {_pct(f['availability'])}, goodput "
            f"{_pct(f['goodput_fraction'])} ({_num(f['goodput_tokens_per_s'], '.0f')} tokens/s)",
            f"  events         {shown or 'none'}",
            f"  time (s)       train {_num(t['train'], '.0f')}  checkpoint "
            f"{_num(t['checkpoint'], '.0f')} ({ck['count']} x {_num(ck['write_s'], '.2f')} s, "
            f"every {ck['interval_steps']} steps)  down {_num(t['down'], '.0f')}  restart "
            f"{_num(t['restart'], '.0f')}  lost work {_num(t['lost_work'], '.0f')} "
            f"({f['lost_steps']} steps)",
            f"  closed form    job MTBF {_num(mtbf / 3600 if mtbf else None)} h, Young interval "
            f"{_num(ex.get('young_interval_s'), '.0f')} s, Daly "
            f"{_num(ex.get('daly_interval_s'), '.0f')} s, expected goodput "
            f"{_pct(ex.get('goodput_fraction'))} (random failures only)",
        ]
    )
