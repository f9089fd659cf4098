"""The summary of a serving run and its text table: pure functions of the records.

Definitions (those of vLLM's ``benchmark_serving.py``, over the *measured* requests: not
rejected and arriving at or after ``warmup_s``):

- TTFT = first token - arrival; E2E = finish - arrival; queue time = first scheduled -
  arrival; TPOT = (finish - first token) / (output tokens - 1), for requests with more
  than one output token.
- The measurement window is ``[warmup_s, duration_s]`` (``measured_window_s`` = its
  length; the drain after ``duration_s`` is outside it). As in vLLM-style benchmarks,
  ``throughput_tokens_per_s`` = output tokens generated within the window (each
  iteration's sampled tokens, emitted at its end, whichever request they belong to) /
  the window's length, and ``requests_per_s`` = requests that finished within the window
  / its length: a server that keeps up reports about the offered load, an overloaded one
  its capacity. ``offered_tokens_per_s`` / ``offered_requests_per_s``: the output tokens
  / requests that arrived within the window (rejected ones included) / its length, so
  achieved and offered sit side by side.
- Latency percentiles, ``completed_requests``, ``output_tokens`` and ``prompt_tokens``
  cover the measured requests, whenever they finished (drain included);
  ``unfinished_requests``: measured requests still unfinished when the run stopped (the
  10x drain cap), ``lost_requests``: measured requests lost with a failed rank
  (``failures.recovery.on_rank_loss: lose``), never finished but not left unfinished;
  ``drained``: every request not rejected or lost finished before the cap.
- SLO attainment: the share of measured requests meeting the TTFT target, the TPOT target
  (a one-token output meets it), and both; unfinished requests meet neither.
- ``dropped_fraction``: the MoE layers' expected capacity drops, averaged over
  iterations weighted by their batch tokens.
- ``offload`` (only with ``policies.offload.experts``): the share of expert uses served by
  each tier (``hit_rate``: HBM cache, ``in_flight`` (a prefetch still being copied when
  the layer needed it: the use waits, so it is no hit), host DRAM, NVMe; they add to 1;
  ``prefetched_share``: the HBM hits that were prefetches landed in time), bytes copied
  into HBM, prefetch copies and waste, and the stall those copies added (``stall_share``
  of the busy time); the stall is part of every iteration's time, so TTFT/TPOT above
  include it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.config.serving import ServingWorkload
from moesim.engine.serving import ServingRecords
from moesim.report.steady import steady_state
from moesim.system import System


def _r(x: float, nd: int = 6) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def _stats_ms(seconds: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/mean in milliseconds (None when there is no value)."""
    v = seconds[np.isfinite(seconds)] * 1e3
    if not v.size:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": _r(p50), "p90": _r(p90), "p99": _r(p99), "mean": _r(float(v.mean()))}


def measured_mask(rec: ServingRecords, warmup_s: float) -> np.ndarray:
    """The requests the metrics cover: not rejected, arrived at or after the warm-up."""
    r = rec.requests
    return (~r.rejected) & (r.arrival_s >= warmup_s)


def lost_mask(rec: ServingRecords) -> np.ndarray:
    """Per request: lost with a failed rank (``on_rank_loss: lose``); never finishes."""
    f = rec.failures
    if f is None:
        return np.zeros(len(rec.requests.arrival_s), dtype=bool)
    return np.asarray(f.lost_requests, dtype=bool)


def window_rates(rec: ServingRecords, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """Achieved and offered rates over the measurement window ``[warmup_s, duration_s]``
    (see the module docstring): tokens generated and requests finished within it, and
    tokens and requests that arrived within it, each over its length."""
    r, it = rec.requests, rec.iterations
    window = duration_s - warmup_s
    ends = it.start_s + it.duration_s
    in_win = (ends >= warmup_s) & (ends <= duration_s)
    generated = int(it.sampled_tokens[in_win].sum())
    finished = int(((~r.rejected) & (r.finish_s >= warmup_s) & (r.finish_s <= duration_s)).sum())
    arrived = (r.arrival_s >= warmup_s) & (r.arrival_s <= duration_s)

    def per_s(x: float) -> float | None:
        return _r(x / window) if window > 0 else None

    return {
        "measured_window_s": _r(window),
        "window_output_tokens": generated,
        "window_completed_requests": finished,
        "throughput_tokens_per_s": per_s(generated),
        "requests_per_s": per_s(finished),
        "offered_tokens_per_s": per_s(float(r.output_tokens[arrived].sum())),
        "offered_requests_per_s": per_s(float(arrived.sum())),
    }


def latencies_s(rec: ServingRecords) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT, E2E and queue time, seconds (NaN where undefined)."""
    r = rec.requests
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(
            r.output_tokens > 1,
            (r.finish_s - r.first_token_s) / (r.output_tokens - 1),
            np.nan,
        )
    return {
        "ttft": r.first_token_s - r.arrival_s,
        "tpot": tpot,
        "e2e": r.finish_s - r.arrival_s,
        "queue_time": r.first_scheduled_s - r.arrival_s,
    }


def slo_attainment(
    rec: ServingRecords, mask: np.ndarray, ttft_ms: float, tpot_ms: float
) -> dict[str, float | None]:
    """Shares of the measured requests meeting the TTFT target, the TPOT target, both."""
    n = int(mask.sum())
    if not n:
        return {"ttft": None, "tpot": None, "both": None}
    lat = latencies_s(rec)
    done = np.isfinite(rec.requests.finish_s)
    ttft_ok = done & (lat["ttft"] * 1e3 <= ttft_ms)
    tpot_ok = done & ((rec.requests.output_tokens <= 1) | (lat["tpot"] * 1e3 <= tpot_ms))
    return {
        "ttft": _r(float(ttft_ok[mask].mean())),
        "tpot": _r(float(tpot_ok[mask].mean())),
        "both": _r(float((ttft_ok & tpot_ok)[mask].mean())),
    }


def serving_summary(system: System, rec: ServingRecords) -> dict[str, Any]:
    """The ``serving`` workload's summary (see README: Outputs)."""
    s = system.scenario
    w = s.workload
    assert isinstance(w, ServingWorkload)
    r, it = rec.requests, rec.iterations
    mask = measured_mask(rec, w.warmup_s)
    done = mask & np.isfinite(r.finish_s)
    lost = lost_mask(rec)
    lat = latencies_s(rec)
    win = window_rates(rec, w.warmup_s, w.duration_s)
    out_tokens = int(r.output_tokens[done].sum())
    total_blocks = rec.kv_blocks_per_rank * rec.dp
    used = it.kv_blocks_used.sum(axis=1) if it.kv_blocks_used.size else np.zeros(1)
    weights = it.batch_tokens.astype(float)
    dropped = float(np.average(it.dropped_fraction, weights=weights)) if weights.sum() else 0.0
    busy = float(it.duration_s.sum())
    summary: dict[str, Any] = {
        "scenario": s.name,
        "workload": "serving",
        "seed": s.seed,
        "model": s.model.name,
        "cluster": s.cluster.name,
        "devices": s.cluster.devices,
        "dp": rec.dp,
        "duration_s": w.duration_s,
        "warmup_s": w.warmup_s,
        "arrived_requests": len(r.arrival_s),
        "measured_requests": int(mask.sum()),
        "completed_requests": int(done.sum()),
        "unfinished_requests": int((mask & ~np.isfinite(r.finish_s) & ~lost).sum()),
        "lost_requests": int((mask & lost).sum()),
        "rejected_requests": int(r.rejected.sum()),
        "drained": bool(np.isfinite(r.finish_s[~r.rejected & ~lost]).all()),
        "simulated_s": _r(rec.end_s),
        **win,
        "steady_state": steady_state(rec, w.warmup_s, w.duration_s),
        "output_tokens": out_tokens,
        "prompt_tokens": int(r.prompt_tokens[done].sum()),
        "ttft_ms": _stats_ms(lat["ttft"][mask]),
        "tpot_ms": _stats_ms(lat["tpot"][mask]),
        "e2e_ms": _stats_ms(lat["e2e"][mask]),
        "queue_time_ms": _stats_ms(lat["queue_time"][mask]),
        "slo": None,
        "slo_attainment": None,
        "kv_cache_blocks": total_blocks,
        "kv_cache_utilization": {
            "mean": _r(float(used.mean()) / total_blocks) if total_blocks else None,
            "max": _r(float(used.max()) / total_blocks) if total_blocks else None,
        },
        "preemptions": int(r.preemptions[mask].sum()),
        "recomputed_tokens": int(r.recomputed_tokens[mask].sum()),
        "dropped_fraction": _r(dropped, 9),
        "iterations": len(it.duration_s),
        "mean_batch_tokens": _r(float(it.batch_tokens.mean())) if len(it.duration_s) else 0.0,
        "mean_running_seqs": _r(float(it.running_seqs.mean())) if len(it.duration_s) else 0.0,
        "busy_fraction": _r(busy / rec.end_s) if rec.end_s > 0 else 0.0,
        "time_breakdown_s": {
            "attention": _r(float(it.attention_s.sum())),
            "moe": _r(float(it.moe_s.sum())),
            "dense": _r(float(it.dense_s.sum())),
            "head": _r(float(it.head_s.sum())),
        },
        "events": {"simulation": rec.sim_events, "moe_cost_evaluations": rec.moe_evaluations},
    }
    if not w.engine.host.zero:  # a real engine: its host-side time and name
        summary["engine"] = w.engine.name
        summary["time_breakdown_s"]["host"] = _r(float(it.host_s.sum()))
    if rec.offload is not None:
        stall = rec.offload.summary(it.duration_s)
        summary["time_breakdown_s"]["offload_stall"] = stall["stall_s"]
        summary["offload"] = stall
    if w.slo is not None:
        summary["slo"] = {"ttft_ms": w.slo.ttft_ms, "tpot_ms": w.slo.tpot_ms}
        summary["slo_attainment"] = slo_attainment(rec, mask, w.slo.ttft_ms, w.slo.tpot_ms)
    summary["notes"] = (
        sample_notes(summary["completed_requests"]) + window_notes(summary) + engine_notes(system)
    )
    return summary


def window_notes(summary: dict[str, Any]) -> list[str]:
    """Warnings when the measurement window cannot show steady state."""
    notes = []
    offered = summary.get("offered_tokens_per_s") or 0.0
    achieved = summary.get("throughput_tokens_per_s") or 0.0
    window = summary.get("measured_window_s") or 0.0
    e2e = (summary.get("e2e_ms") or {}).get("p50")
    if e2e is not None and window and e2e / 1e3 > window / 3:
        notes.append(
            f"the measurement window ({window:.3g} s) is under 3x the median end-to-end "
            f"latency ({e2e / 1e3:.3g} s): throughput and tails describe the start-up, not "
            "steady state; lengthen duration_s"
        )
    steady = summary.get("steady_state") or {}
    keep = steady.get("keep_up")
    if keep is not None and keep < 0.95:
        notes.append(
            f"over the steady-state window [{steady['start_s']:.3g}, {steady['end_s']:.3g}] s "
            f"the server generates {keep:.0%} of the offered output tokens: it falls behind "
            "(a queue builds)"
        )
    elif not steady and offered > 0 and achieved < 0.9 * offered:
        notes.append(
            f"throughput over the window is {achieved / offered:.0%} of the offered load: "
            "the server falls behind (a queue builds), or the window is too short"
        )
    return notes


#: below this many completed requests a p99 rests on a single request or none
RELIABLE_P99 = 100


def engine_notes(system: System) -> list[str]:
    """Where the engine preset was not measured on this device and model, its host costs
    are extrapolated: say from what."""
    s = system.scenario
    engine = getattr(s.workload, "engine", None)
    if engine is None or engine.host.zero or not engine.measured_on:
        return []
    here = f"{s.cluster.accelerator.name}/{s.model.name}"
    if here in engine.measured_on:
        return []
    return [
        f"engine {engine.name}: host costs measured on {', '.join(engine.measured_on)}, "
        f"extrapolated to {here} (per layer, sequence and token as fitted there)"
    ]


def sample_notes(completed: int) -> list[str]:
    """Warnings about what the measured sample can support."""
    if completed >= RELIABLE_P99:
        return []
    return [
        f"only {completed} measured requests completed: p99 rests on the slowest "
        f"{max(completed // 100, 1)} (or the maximum); lengthen duration_s or raise the "
        "rate for stable tails"
    ]


def _pct(d: dict[str, float | None]) -> str:
    if d["p50"] is None:
        return "n/a"
    return f"p50 {d['p50']:.1f}  p90 {d['p90']:.1f}  p99 {d['p99']:.1f}  mean {d['mean']:.1f}"


def serving_table(summary: dict[str, Any]) -> str:
    """A compact, aligned text table of a serving summary."""
    s = summary
    unfinished, lost = s["unfinished_requests"], s.get("lost_requests", 0)
    status = ", ".join(
        [f"{lost} lost with a failed rank"] * bool(lost)
        + [f"{unfinished} unfinished at the 10x drain cap"] * bool(unfinished)
    ) or ("all finished" if s["drained"] else "all measured finished")
    rows = [
        ("scenario", f"{s['scenario']}  (seed {s['seed']})"),
        (
            "model / cluster",
            f"{s['model']} on {s['cluster']} ({s['devices']} devices, dp {s['dp']})",
        ),
        (
            "requests",
            f"{s['arrived_requests']} arrived in {s['duration_s']} s, {s['measured_requests']} "
            f"measured, {s['completed_requests']} completed ({status}), "
            f"{s['rejected_requests']} rejected",
        ),
        (
            "throughput",
            f"{_num(s['throughput_tokens_per_s'])} output tokens/s, "
            f"{_num(s['requests_per_s'], 2)} requests/s in [{s['warmup_s']}, "
            f"{s['duration_s']}] s (offered {_num(s['offered_tokens_per_s'])} tokens/s, "
            f"{_num(s['offered_requests_per_s'], 2)} requests/s)",
        ),
        ("TTFT (ms)", _pct(s["ttft_ms"])),
        ("TPOT (ms)", _pct(s["tpot_ms"])),
        ("E2E (ms)", _pct(s["e2e_ms"])),
        ("queue (ms)", _pct(s["queue_time_ms"])),
    ]
    if s["slo_attainment"] is not None:
        a, t = s["slo_attainment"], s["slo"]
        rows.append(
            (
                "SLO attainment",
                f"both {_share(a['both'])}  (TTFT <= {t['ttft_ms']} ms: {_share(a['ttft'])}, "
                f"TPOT <= {t['tpot_ms']} ms: {_share(a['tpot'])})",
            )
        )
    kv = s["kv_cache_utilization"]
    b = s["time_breakdown_s"]
    busy = sum(v or 0.0 for v in b.values()) or 1.0
    rows += [
        (
            "KV cache",
            f"{s['kv_cache_blocks']} blocks, utilization mean {_share(kv['mean'])} "
            f"max {_share(kv['max'])}; {s['preemptions']} preemptions",
        ),
        (
            "iterations",
            f"{s['iterations']}, mean {s['mean_batch_tokens']:.1f} tokens / "
            f"{s['mean_running_seqs']:.1f} sequences, busy {_share(s['busy_fraction'])}",
        ),
        (
            "  time in",
            "  ".join(f"{k} {100 * (v or 0.0) / busy:.1f}%" for k, v in b.items()),
        ),
        ("MoE dropped", f"{100 * (s['dropped_fraction'] or 0.0):.2f}% of token-choice slots"),
    ]
    if s.get("offload") is not None:
        o = s["offload"]
        h = o["hit_rate"]
        late = (
            f" ({_share(o['prefetched_share'])} prefetched in time), prefetch in flight "
            f"{_share(h['in_flight'])}"
            if o.get("prefetch_accuracy") is not None
            else ""
        )
        rows += [
            (
                "offload",
                f"{o['policy']} cache of {o['cache_experts_per_device']} / "
                f"{o['device_experts']} experts per device; served from HBM {_share(h['hbm'])}"
                f"{late}, DRAM {_share(h['dram'])}, NVMe {_share(h['nvme'])}",
            ),
            (
                "  copies",
                f"{o['bytes_moved_gib']:.1f} GiB moved ({o['prefetch_copies']} prefetches, "
                f"{o['wasted_prefetch_gib']:.1f} GiB wasted); stall {o['stall_s']:.2f} s = "
                f"{_share(o['stall_share'])} of busy time",
            ),
        ]
    rows += [("note", n) for n in s.get("notes", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _num(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
