"""Run a capacity plan: prune in closed form, simulate the survivors, rank the feasible.

The survivors of :mod:`moesim.sweep.plan` are simulated on the sweep's executor and result
store (:func:`moesim.sweep.runner.run_points`: a process pool, each finished point written
atomically to ``<out>/plans/<name>/points/NNNN.json`` with the digest of its resolved
scenario, so an interrupted plan resumes and a changed one reruns only what changed). They
run in order of device count; once a count has a feasible configuration of an accelerator,
``beyond`` more counts of that accelerator are simulated (default none: at a fixed load
more devices idle more, so a larger count rarely wins on energy per token; ``--beyond 1``
checks) and the rest are reported
as not simulated. Every simulated candidate is judged by the shared definition
(:mod:`moesim.report.feasibility`): it keeps up with the load over the steady-state window
and its p99 TTFT and TPOT are within the targets, on at least 100 completed requests.
The feasible ones are ranked by devices, by energy per output token over the steady-state
window and, with prices, by cost per million output tokens.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim.config.sweep import Bound
from moesim.report.feasibility import MIN_REQUESTS, judge
from moesim.report.files import write_json_atomic, write_text_atomic
from moesim.sweep.plan import Candidate, Pruned, default_devices, search_space
from moesim.sweep.points import Point
from moesim.sweep.runner import Options, RunSettings, _digest, run_points


@dataclass
class Row:
    """A simulated candidate and its verdict."""

    candidate: Candidate
    reason: str
    feasible: bool
    figures: dict[str, float | None]
    """throughput, p99 TTFT/TPOT, energy per token (steady-state window and whole run),
    cost per million tokens (with a price)."""


@dataclass
class PlanResult:
    """What the plan found."""

    scenario: str
    rate: float
    ttft_ms: float | None
    tpot_ms: float | None
    folder: Path
    rows: list[Row] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)
    """Survivors of the closed-form checks left unsimulated (a smaller count serves)."""
    ran: int = 0
    reused: int = 0
    common: list[str] = field(default_factory=list)
    """The overrides every candidate shares (the plan's --set, rate and SLO)."""

    @property
    def feasible(self) -> list[Row]:
        return [r for r in self.rows if r.feasible]

    def best(self, key: str) -> list[Row]:
        """Feasible rows, cheapest first by ``devices``, ``energy`` or ``cost``."""
        inf = float("inf")

        def energy(r: Row) -> float:
            e = r.figures.get("energy_per_token_j_steady") or r.figures.get("energy_per_token_j")
            return inf if e is None else e

        if key == "devices":
            return sorted(self.feasible, key=lambda r: (r.candidate.devices, energy(r)))
        if key == "energy":
            return sorted(self.feasible, key=energy)
        costed = [r for r in self.feasible if r.figures.get("usd_per_million_tokens") is not None]
        return sorted(costed, key=lambda r: float(r.figures["usd_per_million_tokens"] or inf))


def _figures(summary: dict[str, Any], c: Candidate, prices: dict[str, float]) -> dict[str, Any]:
    energy = summary.get("energy") or {}
    tput = summary.get("steady_state", {}).get("throughput_tokens_per_s")
    out: dict[str, Any] = {
        "throughput_tokens_per_s": tput,
        "ttft_ms_p99": (summary.get("ttft_ms") or {}).get("p99"),
        "tpot_ms_p99": (summary.get("tpot_ms") or {}).get("p99"),
        "energy_per_token_j_steady": energy.get("steady_energy_per_token_j"),
        "energy_per_token_j": energy.get("energy_per_token_j"),
        "usd_per_million_tokens": None,
        "dropped_fraction": summary.get("dropped_fraction"),
    }
    price = prices.get(c.accelerator)
    if price is not None and tput:
        out["usd_per_million_tokens"] = round(c.devices * price / (tput * 3600) * 1e6, 6)
    return out


def run_plan(
    scenario: str | Path,
    rate: float,
    ttft_ms: float | None,
    tpot_ms: float | None,
    *,
    overrides: Sequence[str] = (),
    accelerators: Sequence[str] = (),
    devices: Sequence[int] = (),
    layouts: str = "auto",
    etps: Sequence[int] = (1,),
    engines: Sequence[str | None] = (None,),
    capacity_factors: Sequence[float | str | None] = ("base",),
    prices: dict[str, float] | None = None,
    workers: int = 1,
    out: str | Path = "reports",
    fresh: bool = False,
    beyond: int = 0,
    progress: Callable[[str], None] | None = None,
    allow_paths: Sequence[str] = (),
    limits: bool = True,
) -> PlanResult:
    """Search, prune, simulate and judge (see the module); ``overrides`` apply to every
    candidate, as ``--set`` does."""
    from moesim.loader import load_scenario

    opts = Options(tuple(str(a) for a in allow_paths), limits)
    slo = []
    if ttft_ms is not None or tpot_ms is not None:
        slo = [
            f"workload.slo={{ttft_ms: {ttft_ms if ttft_ms is not None else 1e12}, "
            f"tpot_ms: {tpot_ms if tpot_ms is not None else 1e12}}}"
        ]
    common = [*overrides, f"workload.arrival.rate_per_s={rate!r}", *slo]

    def load(sets: Sequence[str]) -> Any:
        return load_scenario(
            scenario, [*common, *sets], allow_paths=opts.allow_paths, limits=limits
        )

    from moesim.errors import Issue, Location, ScenarioError

    given = load_scenario(scenario, list(overrides), allow_paths=opts.allow_paths, limits=limits)
    if given.workload.kind != "serving":
        raise ScenarioError(
            [
                Issue(
                    Location(str(scenario)),
                    "workload.kind",
                    f"plan needs a serving workload, got {given.workload.kind}",
                )
            ]
        )
    if getattr(given.cluster, "accelerators_per_node", None) is None:
        raise ScenarioError(
            [
                Issue(
                    Location(str(scenario)),
                    "cluster.kind",
                    "plan varies clusters of GPU nodes (kind nodes), got a torus",
                )
            ]
        )
    base = load([])
    accs = list(accelerators) or [base.cluster.accelerator.name]
    from moesim.catalog import names

    known = names("accelerators")
    unknown = [a for a in accs if a not in known and a != base.cluster.accelerator.name]
    if unknown:
        raise ScenarioError(
            [
                Issue(
                    Location("--accelerators"),
                    "accelerators",
                    f"unknown accelerator preset {a!r}; expected one of: {', '.join(known)}",
                )
                for a in unknown
            ]
        )
    space = search_space(
        base,
        rate,
        tpot_ms,
        accs,
        list(devices) or default_devices(base),
        layouts,
        engines,
        capacity_factors,
        load,
        etps,
    )
    folder = Path(out) / "plans" / base.name
    result = PlanResult(
        str(scenario), rate, ttft_ms, tpot_ms, folder, pruned=list(space.pruned), common=common
    )
    bounds = {}
    if ttft_ms is not None:
        bounds["ttft_ms.p99"] = Bound(max=ttft_ms)
    if tpot_ms is not None:
        bounds["tpot_ms.p99"] = Bound(max=tpot_ms)
    counts = sorted({c.devices for c in space.survivors})
    digests = {c: _digest(space.resolved[c]) for c in space.survivors}
    index = _point_numbers(space.survivors, digests, folder / "points", fresh)
    # per accelerator: the index (into its own counts) of its first feasible count
    found_at: dict[str, int] = {}
    say = progress or (lambda _m: None)
    for n in counts:
        group = []
        for c in (c for c in space.survivors if c.devices == n):
            k = sorted({x.devices for x in space.survivors if x.accelerator == c.accelerator})
            done = found_at.get(c.accelerator)
            if done is not None and k.index(n) > done + beyond:
                result.skipped.append(c)
            else:
                group.append(c)
        if not group:
            continue
        jobs = [
            (
                Point(index[c], c.values(), (*common, *c.overrides)),
                digests[c],
            )
            for c in group
        ]
        outcomes, ran, reused = run_points(
            str(scenario),
            jobs,
            folder / "points",
            RunSettings(workers, "process", opts, fresh),
            f"plan {base.name}, {n} devices",
            say,
        )
        result.ran += ran
        result.reused += reused
        for c in group:
            o = outcomes[index[c]]
            summary = o.get("summary") if o.get("status") == "ok" else None
            error = None if summary is not None else str(o.get("error", "failed"))
            v = judge(summary, error, bounds, None, MIN_REQUESTS)
            figures = _figures(summary, c, prices or {}) if summary is not None else {}
            result.rows.append(Row(c, v.reason, v.feasible, figures))
            if v.feasible and c.accelerator not in found_at:
                own = sorted({x.devices for x in space.survivors if x.accelerator == c.accelerator})
                found_at[c.accelerator] = own.index(n)
    _write(result)
    return result


def _point_numbers(
    survivors: Sequence[Candidate], digests: dict[Candidate, str], points: Path, fresh: bool
) -> dict[Candidate, int]:
    """Each survivor's point file number: that of an earlier point with the same resolved
    scenario where ``points`` holds one (a plan with candidates added or removed still
    reuses what it simulated), else the lowest number no earlier point file has (in order
    of the survivors: a new plan numbers them 0, 1, ...)."""
    known: dict[str, int] = {}
    for f in [] if fresh else sorted(points.glob("*.json")):
        try:
            record = json.loads(f.read_text("utf-8"))
            number = int(f.stem)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("scenario_sha256_16"), str):
            known.setdefault(record["scenario_sha256_16"], number)
    taken = set(known.values())
    out: dict[Candidate, int] = {}
    used: set[int] = set()
    free = 0
    for c in survivors:
        number = known.get(digests[c], -1)
        if number < 0 or number in used:
            while free in taken or free in used:
                free += 1
            number = free
        used.add(number)
        out[c] = number
    return out


def _write(r: PlanResult) -> None:
    cols = [
        "throughput_tokens_per_s",
        "ttft_ms_p99",
        "tpot_ms_p99",
        "energy_per_token_j_steady",
        "energy_per_token_j",
        "usd_per_million_tokens",
        "dropped_fraction",
    ]
    keys = ["accelerator", "devices", "dp", "tp", "ep", "etp", "engine", "capacity_factor"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*keys, "stage", "feasible", "reason", *cols])

    def values(c: Candidate) -> list[Any]:
        v = {**c.values(), "etp": c.etp}
        return ["" if v.get(k) is None else v.get(k) for k in keys]

    for row in r.rows:
        w.writerow(
            [*values(row.candidate), "simulated", row.feasible, row.reason]
            + ["" if row.figures.get(k) is None else row.figures[k] for k in cols]
        )
    for p in r.pruned:
        w.writerow([*values(p.candidate), "pruned", False, p.reason] + [""] * len(cols))
    for c in r.skipped:
        w.writerow(
            [*values(c), "not simulated", "", "a smaller device count serves the load"]
            + [""] * len(cols)
        )
    write_text_atomic(r.folder / "plan.csv", buf.getvalue())
    write_json_atomic(
        r.folder / "plan.json",
        {
            "scenario": r.scenario,
            "rate_per_s": r.rate,
            "slo": {"ttft_ms_p99": r.ttft_ms, "tpot_ms_p99": r.tpot_ms},
            "simulated": [
                {
                    **row.candidate.values(),
                    "feasible": row.feasible,
                    "reason": row.reason,
                    "figures": row.figures,
                    "overrides": list(row.candidate.overrides),
                }
                for row in r.rows
            ],
            "pruned": [{**p.candidate.values(), "reason": p.reason} for p in r.pruned],
            "not_simulated": [c.values() for c in r.skipped],
            "best": {
                key: [row.candidate.values() for row in r.best(key)[:3]]
                for key in ("devices", "energy", "cost")
            },
        },
    )


def run_command(r: PlanResult, row: Row) -> str:
    """The ``moesim run`` command line of one candidate (its scenario as the plan ran it)."""
    import shlex

    sets = [*r.common, *row.candidate.overrides]
    return " ".join(
        ["moesim run", shlex.quote(r.scenario), *(f"--set {shlex.quote(x)}" for x in sets)]
    )


def plan_table(r: PlanResult, top: int = 5) -> str:
    """The answer first (cheapest feasible configurations), then every rejection."""

    def fig(row: Row, k: str, fmt: str) -> str:
        v = row.figures.get(k)
        return "-" if v is None else format(v, fmt)

    def line(row: Row) -> str:
        return (
            f"  {row.candidate.label:<34} {fig(row, 'throughput_tokens_per_s', '.0f'):>8} tok/s  "
            f"TTFT p99 {fig(row, 'ttft_ms_p99', '.0f'):>6} ms  "
            f"TPOT p99 {fig(row, 'tpot_ms_p99', '.1f'):>5} ms  "
            f"{fig(row, 'energy_per_token_j_steady', '.3f')} J/token steady "
            f"({fig(row, 'energy_per_token_j', '.3f')} whole run)"
            + (
                f"  ${fig(row, 'usd_per_million_tokens', '.2f')}/M tokens"
                if row.figures.get("usd_per_million_tokens") is not None
                else ""
            )
            + (
                f"  drops {100 * (row.figures.get('dropped_fraction') or 0.0):.2f}% of choices"
                if row.figures.get("dropped_fraction")
                else ""
            )
        )

    slo = " and ".join(
        x
        for x in (
            f"p99 TTFT <= {r.ttft_ms:g} ms" if r.ttft_ms is not None else "",
            f"p99 TPOT <= {r.tpot_ms:g} ms" if r.tpot_ms is not None else "",
        )
        if x
    )
    out = [f"plan: {r.rate:g} requests/s{' within ' + slo if slo else ''} ({r.scenario})"]
    if not r.feasible:
        out.append("\nno candidate is feasible; the closest are listed below with why not")
    for key, title in (
        ("devices", "fewest devices"),
        ("energy", "least energy per output token (steady-state window)"),
        ("cost", "lowest cost per million output tokens"),
    ):
        rows = r.best(key)[:top]
        if rows:
            out += [f"\ncheapest by {title}:", *(line(x) for x in rows)]
    if r.feasible:
        out += ["\ncheck the first with a plain run:", "  " + run_command(r, r.best("devices")[0])]
    rejected = [x for x in r.rows if not x.feasible]
    if rejected:
        out.append("\nsimulated and rejected:")
        out += [f"  {x.candidate.label:<34} {x.reason}" for x in rejected]
    if r.pruned:
        out.append("\npruned without simulation (closed form):")
        out += [f"  {p.candidate.label:<34} {p.reason}" for p in r.pruned]
    if r.skipped:
        out.append(
            f"\nnot simulated: {len(r.skipped)} candidates with more devices than needed "
            "(--beyond simulates more counts)"
        )
    out.append(
        f"\n{len(r.rows)} simulated ({r.ran} ran, {r.reused} reused), {len(r.pruned)} pruned; "
        f"results in {r.folder}"
    )
    return "\n".join(out)
