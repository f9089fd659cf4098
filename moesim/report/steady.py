"""The steady-state window of a serving run: where throughput is compared with the load.

A server that keeps up generates, once it has filled, output tokens at the rate they are
offered; but tokens are generated over a request's whole lifetime, so for about one
end-to-end latency after the start the generation rate ramps up from zero. A window that
begins at ``warmup_s`` shorter than that latency measures the ramp and makes a server that
keeps up look behind (the capacity search's "falls behind" on a short window). The
steady-state window starts when the ramp is over: at the later of ``warmup_s`` and the
90th-percentile end-to-end latency of the measured requests (at most half the arrival
period: an overloaded server's latency grows without bound, and its throughput over any
later window is its capacity, still below the load), and ends at ``duration_s`` (the
drain, when nothing arrives any more, is outside it). Over it:

- ``throughput_tokens_per_s``: output tokens generated (each iteration's sampled tokens,
  at its end) within the window / its length;
- ``offered_tokens_per_s``: the output tokens due within it / its length: each request's
  tokens (rejected ones included) spread evenly over its typical lifetime, from arrival
  plus the median TTFT for ``output tokens x median TPOT`` (a server that keeps up
  generates them there; an overloaded one falls behind it at any TTFT and TPOT);
- ``keep_up``: their ratio (None when nothing was offered).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.engine.serving import ServingRecords


def steady_window(rec: ServingRecords, warmup_s: float, duration_s: float) -> tuple[float, float]:
    """``(start_s, end_s)`` of the steady-state window (see the module)."""
    r = rec.requests
    done = (~r.rejected) & (r.arrival_s >= warmup_s) & np.isfinite(r.finish_s)
    ramp = float(np.percentile(r.finish_s[done] - r.arrival_s[done], 90)) if done.any() else 0.0
    start = max(warmup_s, min(ramp, duration_s / 2))
    return start, duration_s


def _due_tokens(rec: ServingRecords, warmup_s: float, start: float, end: float) -> float:
    """Output tokens a server that keeps up generates within ``[start, end]``: each
    request's tokens spread evenly over its typical lifetime, from its arrival plus the
    median TTFT (at most ``start``: a delay never moves the load out of the window) for
    its output tokens times the median TPOT of the measured requests."""
    r = rec.requests
    done = (~r.rejected) & (r.arrival_s >= warmup_s) & np.isfinite(r.finish_s)
    a = r.arrival_s.astype(float)
    out = r.output_tokens.astype(float)
    if not done.any():
        inside = (a >= start) & (a <= end)
        return float(out[inside].sum())
    first = r.first_token_s[done] - r.arrival_s[done]
    shift = min(float(np.median(first)), start)
    many = done & (r.output_tokens > 1)
    tpot = (
        float(np.median((r.finish_s[many] - r.first_token_s[many]) / (out[many] - 1)))
        if many.any()
        else 0.0
    )
    begin = a + shift
    life = np.maximum(out * tpot, 1e-9)
    overlap = np.clip(np.minimum(begin + life, end) - np.maximum(begin, start), 0.0, None)
    return float((out * overlap / life).sum())


def steady_state(rec: ServingRecords, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """The ``steady_state`` section of a serving summary (see the module)."""
    start, end = steady_window(rec, warmup_s, duration_s)
    it = rec.iterations
    ends = it.start_s + it.duration_s
    length = end - start
    generated = float(it.sampled_tokens[(ends >= start) & (ends <= end)].sum())
    offered = _due_tokens(rec, warmup_s, start, end)
    if length <= 0:
        return {
            "start_s": round(start, 6),
            "end_s": round(end, 6),
            "throughput_tokens_per_s": None,
            "offered_tokens_per_s": None,
            "keep_up": None,
        }
    return {
        "start_s": round(start, 6),
        "end_s": round(end, 6),
        "throughput_tokens_per_s": round(generated / length, 6),
        "offered_tokens_per_s": round(offered / length, 6),
        "keep_up": round(generated / offered, 6) if offered > 0 else None,
    }
