"""The summary of a run: a plain JSON-able dict computed from the engine's records.

Pure functions only: no I/O, no wall-clock values (so the same scenario and seed give a
byte-identical summary).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.engine.layer_sim import LayerRecords, layer_tokens
from moesim.engine.moe_layer import critical_path
from moesim.system import System
from moesim.units import GB


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


def layer_summary(system: System, rec: LayerRecords) -> dict[str, Any]:
    """The ``layer`` workload's summary (see README: Outputs)."""
    s = system.scenario
    m = s.model
    r = rec.routing
    tl = rec.timeline
    n_dev = len(system.topology.devices)
    busy = np.zeros(n_dev)
    for iv in tl.intervals:
        busy[iv.device] += iv.end_s - iv.start_s
    finish = np.zeros(n_dev)
    for d, t in tl.rank_done_s.items():
        finish[d] = t
    for d, t in tl.expert_end_s.items():
        finish[d] = max(finish[d], t)
    tokens = layer_tokens(s)
    slots = tokens * m.top_k
    expert_load = r.counts.sum(axis=0)
    dev_load = np.array(
        [int(rec_load.sum()) for rec_load in _expert_device_loads(system, rec).values()]
    )
    a2a = _a2a_bytes(system, rec)
    link_util = _busiest_link(system, rec)
    return {
        "scenario": s.name,
        "workload": "layer",
        "seed": s.seed,
        "model": m.name,
        "cluster": s.cluster.name,
        "devices": n_dev,
        "time_ms": _ms(rec.time_s),
        "tokens": tokens,
        "top_k": m.top_k,
        "slots": slots,
        "processed_slots": int(expert_load.sum()),
        "dropped_tokens": r.dropped,
        "dropped_fraction": round(r.dropped / slots, 9) if slots else 0.0,
        "fully_dropped_tokens": r.fully_dropped,
        "rerouted_slots": r.rerouted,
        "capacity_per_expert": r.capacity,
        "expert_load": [int(x) for x in expert_load],
        "routing_groups": int(r.counts.shape[0]),
        "expert_load_max_group": [int(x) for x in r.counts.max(axis=0)],
        "load_imbalance": round(float(dev_load.max() / dev_load.mean()), 6)
        if dev_load.size and dev_load.mean() > 0
        else 1.0,
        "device_time_ms": [_ms(float(b)) for b in busy],
        "device_finish_ms": [_ms(float(f)) for f in finish],
        "a2a_bytes": a2a["dispatch"] + a2a["combine"],
        "a2a_bytes_by_phase": a2a,
        "network_bytes": int(rec.sent_bytes),
        "breakdown_ms": _breakdown(rec),
        "busiest_link": link_util,
        "events": {"simulation": rec.sim_events, "network_rate_updates": rec.network_events},
    }


def _expert_device_loads(system: System, rec: LayerRecords) -> dict[int, np.ndarray]:
    return rec.timeline.expert_loads


def _a2a_bytes(system: System, rec: LayerRecords) -> dict[str, int]:
    """Bytes sent between distinct devices (tokens that stay on their device move nothing)."""
    remote = rec.timeline.remote_tokens
    c = system.layer_costs
    return {
        "dispatch": int(remote * c.dispatch_bytes_per_token),
        "combine": int(remote * c.combine_bytes_per_token),
    }


def _busiest_link(system: System, rec: LayerRecords) -> dict[str, Any] | None:
    if not rec.link_bytes.any() or rec.time_s <= 0:
        return None
    # the most utilized link (bytes / what it could carry over the layer), not the most bytes
    i = int(np.argmax(rec.link_bytes / system.paths.bandwidth_gbps))
    u, v = system.paths.edges[i]
    bw = float(system.paths.bandwidth_gbps[i])
    return {
        "link": f"{u}->{v}",
        "bytes": int(rec.link_bytes[i]),
        "bandwidth_gbps": bw,
        "utilization": round(float(rec.link_bytes[i]) / (bw * GB * rec.time_s), 6),
    }


def _breakdown(rec: LayerRecords) -> dict[str, float]:
    """The layer's critical path in ms (see :func:`moesim.engine.moe_layer.critical_path`)."""
    return {k: _ms(v) for k, v in critical_path(rec.timeline).items()}
