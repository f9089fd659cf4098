"""The ``failures`` section of a summary, and the failure timeline as trace events.

Serving (pure functions of :class:`moesim.engine.serving.ServingRecords`; only events
before the run stopped, ``simulated_s``, count):

- ``availability``: time-average share of devices up over the run; ``full_capacity``:
  share of the time with every device up; ``service_availability``: share of the time the
  server could make progress (no failure waiting to be noticed, which stalls every rank,
  and at least one data-parallel rank with all its devices up);
- ``windows``: each device failure from its failure to its recovery (or the end of the
  run), each straggler and each link event over its own span, as ``start_s``, ``end_s``,
  ``kind`` (device_failure, straggler, link) and ``what``, with the measured requests
  whose lifetime overlaps it;
- ``phases``, around the device failure windows only: a measured request is ``before``
  if it finished before the first device failure, ``during`` if its lifetime
  ``[arrival, finish]`` (an unfinished or lost request: to the end of the run) overlaps a
  device failure window, ``after`` if it arrived after the last recovery, ``between`` if
  it lived wholly in a healthy gap between two windows; without device failures every
  request is ``before``. Each phase has TTFT / TPOT / E2E percentiles and the iteration
  times of the iterations that started in it (``during``: inside a window);
- MoE token-choice slots (expected, summed over iterations and MoE layers, rounded to
  whole slots) sent to a replica, rerouted to a next choice, or dropped because their
  expert was dead;
- requests requeued from a failed rank (their KV recomputed) or lost with it (over the
  whole run, warm-up included);
- ``goodput_tokens_per_s`` / ``goodput_requests_per_s``: output tokens / requests of the
  measured requests that finished within the measurement window ``[warmup_s,
  duration_s]`` and met the SLO (TTFT and TPOT targets of ``workload.slo``; without one,
  every such request counts), per second of the window (``goodput_basis`` says which).
  All of those tokens were generated within the window, so goodput <= the summary's
  ``throughput_tokens_per_s``.

Training: the run's time split (train, checkpoint, lost, down, restart), availability
(time the job was working / wall time), goodput (useful steps x step time / wall time),
work lost, and the closed forms of :mod:`moesim.failures.training_run` next to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.engine.serving import ServingRecords
from moesim.failures.serving import ServingFailureRecords
from moesim.failures.state import FailurePlan
from moesim.failures.training_run import TrainingRunRecords, expected
from moesim.report.serving import _r, _stats_ms, latencies_s, measured_mask
from moesim.system import System


def _events(plan: FailurePlan, end_s: float) -> list[dict[str, Any]]:
    """The plan's events before ``end_s`` (the simulated span)."""
    return [
        {"time_s": _r(e.time_s), "kind": e.kind, "device": e.device, "detail": e.detail}
        for e in plan.events
        if e.time_s < end_s
    ]


def _device_failures(plan: FailurePlan, end_s: float) -> int:
    return sum(1 for e in plan.events if e.kind == "fail" and e.time_s < end_s)


def _availability(plan: FailurePlan, devices: int, end_s: float) -> tuple[float, float]:
    up = full = 0.0
    for a, b, st in plan.spans():
        b = min(b, end_s)
        if b <= a:
            continue
        up += (b - a) * (devices - len(st.dead)) / devices
        full += (b - a) * (not st.dead)
    return (up / end_s, full / end_s) if end_s > 0 else (1.0, 1.0)


def _service_availability(plan: FailurePlan, dp: int, tp: int, end_s: float) -> float:
    """Share of ``[0, end_s)`` in which the server can serve: nothing stalled waiting for
    detection and some DP rank (its ``tp`` devices) entirely up."""
    serving = 0.0
    for a, b, st in plan.spans():
        b = min(b, end_s)
        if b <= a:
            continue
        dead_ranks = {d // tp for d in st.dead}
        if not st.stalled and len(dead_ranks) < dp:
            serving += b - a
    return serving / end_s if end_s > 0 else 1.0


def failure_windows(plan: FailurePlan, end_s: float) -> list[tuple[float, float, str, str]]:
    """Device failures (failure to recovery), stragglers and link events over their spans
    as ``(start_s, end_s, kind, what)``, clipped to ``end_s`` (a window still open then
    ends there), in time order; only those starting before ``end_s``."""
    out: list[tuple[float, float, str, str]] = []
    events = [e for e in plan.events if e.time_s < end_s]
    closes = {
        "fail": "recover",
        "straggler_start": "straggler_end",
        "link_degraded": "link_restored",
    }
    kinds = {"fail": "device_failure", "straggler_start": "straggler", "link_degraded": "link"}
    for i, e in enumerate(events):
        if e.kind not in closes:
            continue
        stop = next(
            (
                x.time_s
                for x in events[i + 1 :]
                if x.kind == closes[e.kind] and x.device == e.device
            ),
            end_s,
        )
        what = f"device {e.device} " + (
            "failed" + (f" ({e.detail})" if e.detail else "") if e.kind == "fail" else e.detail
        )
        out.append((e.time_s, min(stop, end_s), kinds[e.kind], what))
    return sorted(out, key=lambda x: (x[0], x[1]))


PHASES = ("before", "during", "between", "after")


def request_phases(
    arrival_s: np.ndarray, finish_s: np.ndarray, windows: list[tuple[float, float]], end_s: float
) -> np.ndarray:
    """Per request, the index into :data:`PHASES` around the device failure ``windows``
    (``(start_s, end_s)`` each; see the module docstring). A request that never finished
    lives until ``end_s``."""
    n = len(arrival_s)
    if not windows:
        return np.zeros(n, dtype=np.int64)
    fin = np.where(np.isfinite(finish_s), finish_s, end_s)
    first = min(a for a, _ in windows)
    last = max(b for _, b in windows)
    during = np.zeros(n, dtype=bool)
    for a, b in windows:
        # [arrival, finish] meets [a, b) (a window that never closed runs to the end)
        during |= (arrival_s < b) & (fin > a)
    out = np.full(n, 2, dtype=np.int64)  # between: a healthy gap between windows
    out[fin <= first] = 0
    out[arrival_s >= last] = 3
    out[during] = 1
    return out


def iteration_phases(start_s: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """Per iteration (by its start), the index into :data:`PHASES`."""
    n = len(start_s)
    if not windows:
        return np.zeros(n, dtype=np.int64)
    first = min(a for a, _ in windows)
    last = max(b for _, b in windows)
    during = np.zeros(n, dtype=bool)
    for a, b in windows:
        during |= (start_s >= a) & (start_s < b)
    out = np.full(n, 2, dtype=np.int64)
    out[start_s < first] = 0
    out[start_s >= last] = 3
    out[during] = 1
    return out


def goodput(rec: ServingRecords, w: ServingWorkload, mask: np.ndarray) -> dict[str, Any]:
    """Tokens and requests of the measured requests that finished within ``[warmup_s,
    duration_s]`` and met the SLO (all of them without one), per second of the window."""
    r = rec.requests
    window = w.duration_s - w.warmup_s
    good = mask & np.isfinite(r.finish_s) & (r.finish_s <= w.duration_s)
    if w.slo is not None:
        lat = latencies_s(rec)
        with np.errstate(invalid="ignore"):
            ttft_ok = lat["ttft"] * 1e3 <= w.slo.ttft_ms
            tpot_ok = (r.output_tokens <= 1) | (lat["tpot"] * 1e3 <= w.slo.tpot_ms)
        good &= ttft_ok & tpot_ok
        basis = (
            f"measured requests finished by duration_s with TTFT <= {w.slo.ttft_ms:g} ms "
            f"and TPOT <= {w.slo.tpot_ms:g} ms, per second of [warmup_s, duration_s]"
        )
    else:
        basis = (
            "measured requests finished by duration_s (no workload.slo: all count), per "
            "second of [warmup_s, duration_s]"
        )
    tokens = int(r.output_tokens[good].sum())
    return {
        "goodput_requests": int(good.sum()),
        "goodput_tokens_per_s": _r(tokens / window) if window > 0 else None,
        "goodput_requests_per_s": _r(int(good.sum()) / window) if window > 0 else None,
        "goodput_basis": basis,
    }


def serving_failures_summary(system: System, rec: ServingRecords) -> dict[str, Any]:
    """The ``failures`` section of a serving summary."""
    f = rec.failures
    assert f is not None
    s = system.scenario
    w = s.workload
    assert isinstance(w, ServingWorkload)
    plan = f.plan
    end = rec.end_s
    devices = len(system.topology.devices)
    avail, full = _availability(plan, devices, end)
    service = _service_availability(plan, s.parallelism.dp, s.parallelism.tp, end)
    r, it = rec.requests, rec.iterations
    mask = measured_mask(rec, w.warmup_s)
    lat = latencies_s(rec)
    raw = failure_windows(plan, end)
    fin = np.where(np.isfinite(r.finish_s), r.finish_s, end)
    windows = [
        {
            "start_s": _r(a),
            "end_s": _r(b),
            "kind": k,
            "what": what,
            "requests": int((mask & (r.arrival_s < b) & (fin > a)).sum()),
        }
        for a, b, k, what in raw
    ]
    dev = [(a, b) for a, b, k, _ in raw if k == "device_failure"]
    req_phase = request_phases(r.arrival_s, r.finish_s, dev, end)
    it_phase = iteration_phases(it.start_s, dev)
    phases: dict[str, Any] = {}
    for k, name in enumerate(PHASES):
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
    return {
        "events": _events(plan, end),
        "device_failures": _device_failures(plan, end),
        "windows": windows,
        "states": [
            {"from_s": _r(a), "until_s": _r(min(b, end)), "state": st.describe()}
            for a, b, st in plan.spans()
            if a < end
        ],
        "availability": _r(avail),
        "full_capacity": _r(full),
        "service_availability": _r(service),
        "recovery": s.failures.recovery.on_expert_loss if s.failures else None,
        "replicas": _replica_count(system),
        "moe_slots": {
            "failed_over": _count(slots * f.failed_over_fraction),
            "rerouted": _count(slots * f.rerouted_fraction),
            "dropped_lost_expert": _count(slots * f.lost_fraction),
            "total": _count(slots),
        },
        "requeued_requests": f.requeued,
        "requeue_recomputed_tokens": f.requeue_recomputed_tokens,
        "lost_requests": int(f.lost_requests.sum()),
        **goodput(rec, w, mask),
        "phases": phases,
    }


def _count(expected: np.ndarray) -> int:
    """An expected count (a sum of fractional expectations) as a whole number."""
    return round(float(expected.sum()))


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
        "events": _events(plan, wall) if plan is not None else [],
        "device_failures": _device_failures(plan, wall) if plan is not None else 0,
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
        names = tuple(n for n in PHASES if n != "between" or ph[n]["requests"])
        wins = f.get("windows", [])
        win_txt = "; ".join(
            f"{x['start_s']:.1f}-{x['end_s']:.1f} s {x['what']} ({x['requests']} requests)"
            for x in wins[:4]
        ) + (f"; ... {len(wins) - 4} more" if len(wins) > 4 else "")

        def row(key: str, stat: str) -> str:
            return "/".join(_num(ph[n][key][stat]) for n in names)

        slots = f["moe_slots"]
        return "\n".join(
            [
                f"failures         {f['device_failures']} device failure(s); availability "
                f"{_pct(f['availability'])} (all devices up {_pct(f['full_capacity'])}, "
                f"serving {_pct(f['service_availability'])}); "
                f"recovery {f['recovery']} ({f['replicas']} replicas)",
                f"  events         {shown or 'none'}",
                f"  moe slots      failed over {_num(slots['failed_over'], '.0f')}, rerouted "
                f"{_num(slots['rerouted'], '.0f')}, dropped (dead expert) "
                f"{_num(slots['dropped_lost_expert'], '.0f')} of {_num(slots['total'], '.0f')}",
                f"  requests       {f['requeued_requests']} requeued "
                f"({f['requeue_recomputed_tokens']} tokens recomputed), "
                f"{f['lost_requests']} lost; goodput "
                f"{_num(f['goodput_tokens_per_s'], '.0f')} tokens/s, "
                f"{_num(f['goodput_requests_per_s'], '.2f')} requests/s "
                f"({'SLO met' if summary.get('slo') else 'no SLO: all finished'} "
                "within the window)",
                f"  windows        {win_txt or 'none'}",
                f"  {'/'.join(names)}  requests "
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
