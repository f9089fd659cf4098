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
