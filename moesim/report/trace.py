"""Chrome / Perfetto trace of a simulated timeline (open in ui.perfetto.dev)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.engine.moe_layer import Interval

if TYPE_CHECKING:
    from moesim.failures.state import FailurePlan


def chrome_trace(intervals: list[Interval], device_names: tuple[str, ...]) -> dict[str, Any]:
    """Complete ('X') events, one process per device and one thread per lane."""
    events: list[dict[str, Any]] = []
    for d, name in enumerate(device_names):
        events.append({"ph": "M", "pid": d, "name": "process_name", "args": {"name": name}})
    lanes: dict[str, int] = {}
    for iv in sorted(intervals, key=lambda i: (i.start_s, i.device, i.name)):
        tid = lanes.setdefault(iv.lane, len(lanes))
        events.append(
            {
                "ph": "X",
                "pid": iv.device,
                "tid": tid,
                "name": iv.name,
                "ts": iv.start_s * 1e6,
                "dur": (iv.end_s - iv.start_s) * 1e6,
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def pipeline_trace(
    ops: list[tuple[int, str, int, float, float]],
    stages: int,
    grad_sync_s: float,
    optimizer_s: float,
    pipeline_s: float,
) -> dict[str, Any]:
    """A training step as a trace: one process per pipeline stage, each forward ('F') and
    backward ('B') of a micro-batch as a span, then gradient sync and the optimizer."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": s, "name": "process_name", "args": {"name": f"stage {s}"}}
        for s in range(stages)
    ]
    for stage, op, mb, start, end in sorted(ops, key=lambda o: (o[3], o[0])):
        events.append(
            {
                "ph": "X",
                "pid": stage,
                "tid": 0,
                "name": f"{op}{mb}",
                "cat": "forward" if op == "F" else "backward",
                "ts": start * 1e6,
                "dur": (end - start) * 1e6,
            }
        )
    for stage in range(stages):
        events.append(
            {
                "ph": "X",
                "pid": stage,
                "tid": 1,
                "name": "gradient sync",
                "ts": pipeline_s * 1e6,
                "dur": grad_sync_s * 1e6,
            }
        )
        events.append(
            {
                "ph": "X",
                "pid": stage,
                "tid": 1,
                "name": "optimizer",
                "ts": (pipeline_s + grad_sync_s) * 1e6,
                "dur": optimizer_s * 1e6,
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def failure_events(
    plan: FailurePlan, device_names: tuple[str, ...], pid: int
) -> list[dict[str, Any]]:
    """A failure plan as trace events in process ``pid``: one span per stretch of a failure
    state (thread 0) and an instant per event (failure, recovery, link, straggler)."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": "failures"}},
        {"ph": "M", "pid": pid, "tid": 0, "name": "thread_name", "args": {"name": "state"}},
        {"ph": "M", "pid": pid, "tid": 1, "name": "thread_name", "args": {"name": "events"}},
    ]
    for a, b, st in plan.spans():
        if st.healthy or b <= a:
            continue
        events.append(
            {
                "ph": "X",
                "pid": pid,
                "tid": 0,
                "name": st.describe(),
                "cat": "failure",
                "ts": a * 1e6,
                "dur": (b - a) * 1e6,
            }
        )
    for e in plan.events:
        name = device_names[e.device] if e.device < len(device_names) else str(e.device)
        events.append(
            {
                "ph": "i",
                "s": "p",
                "pid": pid,
                "tid": 1,
                "name": f"{e.kind} {name}",
                "cat": "recovery"
                if e.kind in ("recover", "link_restored", "straggler_end")
                else "failure",
                "ts": e.time_s * 1e6,
                "args": {"device": e.device, "detail": e.detail},
            }
        )
    return events
