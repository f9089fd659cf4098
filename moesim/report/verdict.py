"""The verdict a report opens with: does the run meet its goal, by the shared rules of
:mod:`moesim.report.feasibility` (the ones sweeps, capacity searches and plans use)?

- serving: p99 TTFT and TPOT within ``workload.slo``, keeping up with the offered load
  over the steady-state window, on enough completed requests for a p99;
- training: the layout fits in device memory;
- layer: fits by construction; the verdict states the share of token choices dropped.
"""

from __future__ import annotations

from typing import Any

from moesim.config.sweep import Bound
from moesim.report.feasibility import MIN_REQUESTS, Verdict, judge


def run_verdict(s: dict[str, Any]) -> tuple[Verdict, str]:
    """The verdict and one sentence that states it."""
    kind = s.get("workload")
    if kind == "serving":
        slo = s.get("slo") or {}
        bounds = {}
        if slo.get("ttft_ms") is not None:
            bounds["ttft_ms.p99"] = Bound(max=slo["ttft_ms"])
        if slo.get("tpot_ms") is not None:
            bounds["tpot_ms.p99"] = Bound(max=slo["tpot_ms"])
        v = judge(s, constraints=bounds, min_requests=MIN_REQUESTS if bounds else 0)
        goal = (
            f"p99 TTFT <= {slo['ttft_ms']:g} ms and p99 TPOT <= {slo['tpot_ms']:g} ms"
            if bounds
            else "keeping up with the offered load (no SLO given)"
        )
        rate = s.get("offered_requests_per_s")
        load = f" at {rate:.3g} requests/s" if rate else ""
        if v.feasible:
            return v, f"Meets {goal}{load}."
        return v, f"Does not meet {goal}{load}: {v.reason}."
    v = judge(s)
    if kind == "training":
        if v.feasible:
            return v, "The layout fits in device memory."
        return v, f"The layout does not fit: {v.reason}."
    dropped = s.get("dropped_fraction")
    text = f"{100 * dropped:.2f}% of token choices dropped by capacity." if dropped else ""
    return v, ("Runs. " + text).strip()
