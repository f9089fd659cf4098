"""Capacity search: the highest arrival rate a serving deployment sustains within its SLO.

A capacity planner's question: how many requests per second can this cluster, model and
layout serve while ``target`` of the requests meet the scenario's ``workload.slo`` (TTFT
and TPOT)? The search runs the serving scenario at trial rates (``--set
workload.arrival.rate_per_s=R``), all with the scenario's seed, so a higher rate replays
the same requests arriving proportionally earlier (common random numbers,
:mod:`moesim.engine.serving`): latency then grows with the rate, and the feasible rates
form an interval from 0. It doubles the rate from ``start_rate`` until a rate fails, then
bisects until the bracket is within ``tolerance`` (relative).

A rate is feasible when the run drained (every measured request finished), no request
was rejected or lost, at least ``MIN_REQUESTS`` completed inside the measurement window,
the server kept up with the offered load over the steady-state window (``KEEP_UP``), and
``slo_attainment.both >= target`` (the shared rules of :mod:`moesim.report.feasibility`)
-- for every seed given (``seeds``: the verdict of a
rate near capacity can flip with the arrival sample, so more seeds make it robust). Use a
window several times the end-to-end latency: a short one measures the start-up transient.
Each probe's summary is kept (the worst seed's), so the answer comes with the sustained
throughput, latency percentiles and energy per token at that rate. The probes share the
base seed's memoized MoE layer costs; the seeds vary the arrivals and lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim.errors import Issue, Location, ScenarioError
from moesim.report.feasibility import KEEP_UP, MIN_REQUESTS, judge

__all__ = ["KEEP_UP", "MIN_REQUESTS", "CapacityResult", "Probe", "find_capacity", "why_infeasible"]


@dataclass(frozen=True)
class Probe:
    """One trial rate and what it gave."""

    rate_per_s: float
    feasible: bool
    attainment: float
    summary: dict[str, Any]


@dataclass
class CapacityResult:
    """The search's answer and every probe."""

    target: float
    best: Probe | None
    """The highest feasible rate found (None if even the lowest probe failed)."""
    limit: Probe | None
    """The lowest infeasible rate found (None if the search hit ``max_rate``)."""
    probes: list[Probe] = field(default_factory=list)


def why_infeasible(summary: dict[str, Any], target: float) -> list[str]:
    """Every reason a probe fails (empty: feasible): the shared definition of
    :mod:`moesim.report.feasibility` with ``target`` of the requests within the SLO."""
    return list(judge(summary, target=target).reasons)


def _feasible(summary: dict[str, Any], target: float) -> tuple[bool, float]:
    att = summary.get("slo_attainment") or {}
    both = float(att.get("both") or 0.0)
    return not why_infeasible(summary, target), both


def find_capacity(
    scenario: str | Path,
    overrides: Sequence[str] = (),
    target: float = 0.99,
    start_rate: float | None = None,
    max_rate: float = 1e4,
    tolerance: float = 0.05,
    progress: Callable[[Probe], None] | None = None,
    seeds: int = 1,
    allow_paths: Sequence[str | Path] = (),
    limits: bool = True,
) -> CapacityResult:
    """Search the highest feasible ``workload.arrival.rate_per_s`` (see the module);
    ``allow_paths`` and ``limits`` as for :func:`moesim.loader.load_scenario`."""
    from moesim.api import run
    from moesim.config.serving import GammaArrival, PoissonArrival, ServingWorkload
    from moesim.engine.layer_sim import simulated_layer_cost
    from moesim.loader import load_scenario
    from moesim.system import build_system

    base = load_scenario(scenario, list(overrides), allow_paths=allow_paths, limits=limits)
    w = base.workload
    where = Location(str(scenario))
    if not isinstance(w, ServingWorkload):
        raise ScenarioError([Issue(where, "workload", "capacity search needs a serving workload")])
    if w.slo is None:
        raise ScenarioError(
            [Issue(where, "workload.slo", "capacity search needs SLO targets (ttft_ms, tpot_ms)")]
        )
    if not isinstance(w.arrival, PoissonArrival | GammaArrival):
        raise ScenarioError(
            [Issue(where, "workload.arrival", "capacity search varies a poisson or gamma rate")]
        )
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    result = CapacityResult(target, None, None)
    # every probe differs only in its arrival rate: the MoE layer costs are shared
    shared = simulated_layer_cost(build_system(base))

    def probe(rate: float) -> Probe:
        worst: tuple[bool, float, dict[str, Any]] | None = None
        for i in range(seeds):
            extra = [f"seed={base.seed + i}"] if i else []
            s = load_scenario(
                scenario,
                [*overrides, *extra, f"workload.arrival.rate_per_s={rate!r}"],
                allow_paths=allow_paths,
                limits=limits,
            )
            summary = run(s, moe_cost=shared.sharing(shared.system)).summary
            ok, both = _feasible(summary, target)
            if worst is None or (not ok, -both) > (not worst[0], -worst[1]):
                worst = (ok, both, summary)
        assert worst is not None
        p = Probe(rate, worst[0], worst[1], worst[2])
        result.probes.append(p)
        if progress is not None:
            progress(p)
        return p

    rate = start_rate if start_rate is not None else w.arrival.rate_per_s
    # bracket: grow while feasible, shrink while not
    p = probe(rate)
    if p.feasible:
        result.best = p
        while rate < max_rate:
            rate = min(rate * 2, max_rate)
            p = probe(rate)
            if not p.feasible:
                result.limit = p
                break
            result.best = p
        else:
            return result
    else:
        result.limit = p
        while rate > 1e-3:
            rate /= 2
            p = probe(rate)
            if p.feasible:
                result.best = p
                break
            result.limit = p
        else:
            return result
    assert result.best is not None and result.limit is not None
    while result.limit.rate_per_s - result.best.rate_per_s > tolerance * result.best.rate_per_s:
        p = probe((result.best.rate_per_s + result.limit.rate_per_s) / 2)
        if p.feasible:
            result.best = p
        else:
            result.limit = p
    return result


def _num(x: Any) -> float:
    """A summary figure for the table: NaN where the probe measured none (no request)."""
    return float("nan") if x is None else float(x)


def capacity_table(r: CapacityResult) -> str:
    """The probes in rate order and the answer."""
    rows = [
        "  rate/s  feasible  SLO met  throughput tok/s  TTFT p99 ms  TPOT p99 ms  J/token*  why not"
    ]
    for p in sorted(r.probes, key=lambda p: p.rate_per_s):
        s = p.summary
        energy = s.get("energy") or {}
        e = energy.get("steady_energy_per_token_j", energy.get("energy_per_token_j"))
        rows.append(
            f"{p.rate_per_s:8.4g}  {'yes' if p.feasible else 'no':>8}  {p.attainment:7.1%}  "
            f"{_num(s.get('throughput_tokens_per_s')):16.1f}  "
            f"{_num((s.get('ttft_ms') or {}).get('p99')):11.1f}  "
            f"{_num((s.get('tpot_ms') or {}).get('p99')):11.2f}  "
            f"{_num(e):8.3g}  {'; '.join(why_infeasible(s, r.target))}"
        )
    rows.append("  * over the steady-state window (energy.steady_energy_per_token_j)")
    if r.best is None:
        rows.append(f"\nno probed rate met the SLO for {r.target:.0%} of requests")
    else:
        b = r.best.summary
        devices = b.get("devices") or 1
        upper = f" (fails at {r.limit.rate_per_s:.4g})" if r.limit is not None else ""
        rows.append(
            f"\ncapacity: {r.best.rate_per_s:.4g} requests/s{upper} with {r.target:.0%} of "
            f"requests within the SLO; {b.get('throughput_tokens_per_s', 0):.1f} output "
            f"tokens/s, {r.best.rate_per_s / devices:.4g} requests/s per device"
        )
    return "\n".join(rows)
