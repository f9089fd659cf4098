"""One definition of a feasible run, shared by ``sweep``, ``capacity`` and ``plan``.

A run is feasible when all of these hold, and every rule that fails gives a reason in
words (``reason`` column of a sweep's ``results.csv``, the capacity table, the plan):

1. **It ran and fits in memory.** A point that failed (e.g. its weights do not fit a
   device: the loader refuses it) is infeasible with its error; a training layout whose
   peak memory exceeds the device's (``memory_fits`` false) is infeasible with the sizes.
2. **It keeps up with the offered load** (serving): over the steady-state window
   (:mod:`moesim.report.steady`: after the start-up ramp and the warm-up, before the
   drain) the server generates at least ``KEEP_UP`` of the output tokens offered; every
   request not rejected or lost finished (``drained``); nothing was rejected or lost.
3. **It meets the SLO**: every metric bound (``constraints``) holds, and with a
   ``target``, at least that share of the measured requests met ``workload.slo``
   (``slo_attainment.both``); a latency SLO (capacity, plan) is judged on at least
   ``MIN_REQUESTS`` requests completed in the window (fewer cannot support a p99).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moesim.config.sweep import Bound
from moesim.report.fields import metric

KEEP_UP = 0.95
"""A feasible serving run generates at least this share of the offered output tokens over
the steady-state window: a server falling behind builds a queue."""
KV_FULL = 0.9
"""A server falling behind whose KV cache was at least this full on average (over the run)
is held back by memory: the reason says so."""
MIN_REQUESTS = 100
"""With an SLO target, at least this many requests must complete in the window (a p99)."""


@dataclass(frozen=True)
class Verdict:
    """Whether a run is feasible, and every reason it is not."""

    reasons: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        """The reasons in one line ("feasible" when there are none)."""
        return "; ".join(self.reasons) or "feasible"


def memory_reasons(summary: Mapping[str, Any]) -> list[str]:
    """Rule 1 for a finished run: a training layout that does not fit its devices."""
    if summary.get("memory_fits") is not False:
        return []
    g = summary.get("memory_gib") or {}
    return [
        f"out of memory: a device needs {float(g.get('total', 0)):.1f} GiB of "
        f"{float(g.get('capacity', 0)):.1f} GiB"
    ]


def _serving(summary: Mapping[str, Any]) -> bool:
    return summary.get("workload") == "serving" or "slo_attainment" in summary


def _share(x: float) -> str:
    """A share for a reason: whole percent, one decimal where rounding would hide that it
    is under ``KEEP_UP`` (0.9497 reads 94.97%, never 95%)."""
    text = f"{x:.0%}"
    return text if x >= KEEP_UP or round(x, 2) < KEEP_UP else f"{100 * x:.2f}%"


def keep_up_reasons(summary: Mapping[str, Any]) -> list[str]:
    """Rule 2: a serving run keeps up with its load (empty for other workloads)."""
    if not _serving(summary):
        return []
    out = []
    steady = summary.get("steady_state")
    if isinstance(steady, Mapping) and steady.get("keep_up") is not None:
        ratio = float(steady["keep_up"])
        where = (
            f"the steady-state window [{float(steady['start_s']):.3g}, "
            f"{float(steady['end_s']):.3g}] s"
        )
    else:  # a summary without the steady-state section: the measurement window
        offered = float(summary.get("offered_tokens_per_s") or 0.0)
        served = float(summary.get("throughput_tokens_per_s") or 0.0)
        ratio = served / offered if offered > 0 else 1.0
        where = "the measurement window"
    if ratio < KEEP_UP:
        e2e = (summary.get("e2e_ms") or {}).get("p50")
        short = ""
        # near the rule, a window shorter than the ramp may be why (far below it, a
        # growing queue makes every window short: no hint then)
        near = ratio >= 0.8
        if near and isinstance(steady, Mapping) and e2e and steady.get("keep_up") is not None:
            length = float(steady["end_s"]) - float(steady["start_s"])
            if length < 3 * e2e / 1e3:
                short = (
                    f"; the window ({length:.3g} s) is under 3x the median end-to-end latency "
                    "(a ramp, not steady state: lengthen workload.duration_s)"
                )
        kv = (summary.get("kv_cache_utilization") or {}).get("mean")
        full = ""
        if kv is not None and float(kv) >= KV_FULL:
            full = (
                f"; the KV cache is the limit (on average {float(kv):.0%} full): more memory "
                "per device, a larger tp or more devices"
            )
        out.append(
            f"falls behind: serves {_share(ratio)} of the offered load over {where} "
            f"(keep-up rule: >= {KEEP_UP:.0%}){short}{full}"
        )
    if summary.get("drained") is False:
        out.append("not drained by the end of the run")
    if summary.get("rejected_requests") or summary.get("lost_requests"):
        out.append("requests rejected or lost")
    return out


def slo_reasons(
    summary: Mapping[str, Any],
    constraints: Mapping[str, Bound],
    target: float | None,
    min_requests: int = 0,
) -> list[str]:
    """Rule 3: metric bounds and the share of requests within ``workload.slo``."""
    out = []
    for name, b in constraints.items():
        v = metric(summary, name)
        if v is None:
            out.append(f"{name} not measured")
        elif b.max is not None and v > b.max:
            out.append(f"{name} = {v:.4g} > {b.max:g}")
        elif b.min is not None and v < b.min:
            out.append(f"{name} = {v:.4g} < {b.min:g}")
    if target is not None and _serving(summary):
        both = float((summary.get("slo_attainment") or {}).get("both") or 0.0)
        if both < target:
            out.append(f"SLO met by {both:.1%} of requests < {target:.0%}")
    if min_requests and _serving(summary):
        done = int(summary.get("window_completed_requests") or 0)
        if done < min_requests:
            out.append(f"{done} requests in the window < {min_requests} (too few for a p99)")
    return out


def judge(
    summary: Mapping[str, Any] | None,
    error: str | None = None,
    constraints: Mapping[str, Bound] | None = None,
    target: float | None = None,
    min_requests: int | None = None,
) -> Verdict:
    """The verdict on one run: its summary, or the ``error`` it failed with.
    ``min_requests`` defaults to ``MIN_REQUESTS`` with a ``target``, else to none."""
    if error is not None or summary is None:
        return Verdict((f"failed: {error or 'no summary'}",))
    need = min_requests if min_requests is not None else (MIN_REQUESTS if target else 0)
    return Verdict(
        tuple(
            memory_reasons(summary)
            + keep_up_reasons(summary)
            + slo_reasons(summary, constraints or {}, target, need)
        )
    )
