"""Chrome / Perfetto trace of a simulated timeline (open in ui.perfetto.dev)."""

from __future__ import annotations

from typing import Any

from moesim.engine.moe_layer import Interval


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
