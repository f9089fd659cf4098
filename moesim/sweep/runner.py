"""Run a sweep: validate every point first, run the missing ones on a process pool (or a
Ray cluster), write each result atomically as it finishes, then tabulate.

Layout of ``<output_dir>/sweeps/<name>/``:

- ``points/NNNN.json``: one finished point (its varied values, overrides, the digest of
  its resolved scenario, wall time and full summary). A point whose file exists with the
  same scenario digest is not run again, so an interrupted sweep resumes where it stopped,
  and editing the base scenario reruns exactly the points it changes.
- ``results.csv``: one row per point: varied fields, metrics, feasible, pareto.
- ``sweep.json``: the sweep as resolved, the rows and the Pareto front.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.config.sweep import SweepConfig
from moesim.errors import Issue, Location, ScenarioError
from moesim.loader.yamlpos import Positions
from moesim.report.fields import scalars
from moesim.report.files import write_json_atomic, write_text_atomic
from moesim.sweep.pareto import feasible, front, metric
from moesim.sweep.points import Point, expand


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep."""

    config: SweepConfig
    folder: Path
    points: list[Point]
    rows: list[dict[str, float | None]]
    """Metric values per point (None where the summary lacks the metric)."""
    feasible: list[bool]
    pareto: list[int]
    """Indices of the Pareto-optimal feasible points."""
    ran: int
    reused: int


def load_sweep(path: str | Path) -> tuple[SweepConfig, Positions]:
    """Read and validate a sweep file (located errors, as for scenarios)."""
    from moesim.loader.resolve import read_mapping
    from moesim.loader.validate import validate_as

    data, positions = read_mapping(path, "a sweep")
    return validate_as(SweepConfig, data, positions, str(path)), positions


def _digest(scenario: Any) -> str:
    resolved = json.dumps(scenario.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(resolved.encode()).hexdigest()[:16]


def plan(cfg: SweepConfig, base: Path, positions: Positions, file: str) -> list[tuple[Point, str]]:
    """Every point validated (all problems at once, located at the sweep key that made
    them), with the digest of its resolved scenario."""
    from moesim.loader import load_scenario

    out, issues = [], []
    for p in expand(cfg):
        try:
            out.append((p, _digest(load_scenario(base, list(p.overrides)))))
        except ScenarioError as exc:
            point = ", ".join(f"{k}={json.dumps(v)}" for k, v in p.values.items())
            for i in exc.issues:
                issues.append(
                    Issue(_sweep_location(i, positions), f"point {p.index} ({point})", str(i))
                )
    if issues:
        # one issue per place and problem, naming every point it hits
        grouped: dict[tuple[str, str], list[str]] = {}
        for i in issues:
            key = (str(i.location), i.message)
            grouped.setdefault(key, []).append(i.path)
        merged: list[Issue] = []
        for (_, message), points in grouped.items():
            first = next(i for i in issues if i.message == message)
            label = (
                points[0]
                if len(points) == 1
                else f"{len(points)} points: {', '.join(p.split(' (')[0] for p in points)}"
            )
            merged.append(Issue(first.location, label, message))
        raise ScenarioError(merged)
    return out


def _sweep_location(issue: Issue, positions: Positions) -> Location:
    """Where in the sweep file the override behind ``issue`` is written (the ``grid``,
    ``zip`` or ``set`` key); the issue's own location when it is in a scenario file."""
    loc = issue.location
    if not loc.file.startswith("--set "):
        return loc
    key = loc.file[len("--set ") :].partition("=")[0]
    for table in ("grid", "zip", "set"):
        if (table, key) in positions:
            return positions[(table, key)]
    return loc


def _check_metrics(
    cfg: SweepConfig, summary: dict[str, Any], positions: Positions, file: str
) -> None:
    """Every metric must name a number in a run's summary (typos fail after one point,
    which is kept, instead of yielding an empty column)."""
    import difflib

    known = [
        k for k, v in scalars(summary) if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    issues = []
    for i, m in enumerate(cfg.metrics):
        if metric(summary, m) is None:
            close = difflib.get_close_matches(m, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            loc = positions.get(("metrics", i), positions.get(("metrics",), Location(file)))
            issues.append(
                Issue(loc, f"metrics[{i}]", f"{m!r} is not a number in the run summary{hint}")
            )
    if issues:
        raise ScenarioError(issues)


#: the sections an MoE layer's cost depends on: serving points that agree on them (a rate
#: sweep) can share one memoized layer cost
LAYER_COST_KEYS = ("seed", "cluster", "model", "routing", "parallelism", "policies")


def _run_point(
    base: str, overrides: tuple[str, ...], costs: dict[str, Any] | None = None
) -> tuple[dict[str, Any], float]:
    """One point's summary and wall time (runs in a worker process). ``costs`` memoizes
    serving points' MoE layer costs by the sections they depend on (in-process runs)."""
    from moesim.api import run
    from moesim.engine.layer_sim import simulated_layer_cost
    from moesim.loader import load_scenario
    from moesim.system import build_system
    from moesim.workloads import kind_of

    t0 = time.perf_counter()
    scenario = load_scenario(base, list(overrides))
    moe_cost = None
    if costs is not None and kind_of(scenario).shares_layer_cost():
        dump = scenario.model_dump(mode="json", include=set(LAYER_COST_KEYS))
        key = hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
        if key not in costs:
            costs[key] = simulated_layer_cost(build_system(scenario))
        moe_cost = costs[key]
    result = run(scenario, moe_cost=moe_cost)
    return result.summary, time.perf_counter() - t0


Job = tuple[Point, str]
Done = tuple[Point, str, dict[str, Any], float]


def _in_process(base: str, jobs: list[Job], workers: int) -> Iterator[Done]:
    costs: dict[str, Any] = {}  # shared MoE layer costs, for this sweep only
    for p, digest in jobs:
        summary, wall = _run_point(base, p.overrides, costs)
        yield p, digest, summary, wall


def _process_pool(base: str, jobs: list[Job], workers: int) -> Iterator[Done]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(_run_point, base, p.overrides): (p, d) for p, d in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                p, digest = pending.pop(fut)
                summary, wall = fut.result()
                yield p, digest, summary, wall


def _ray(base: str, jobs: list[Job], workers: int) -> Iterator[Done]:
    try:
        import ray
    except ImportError:
        raise ScenarioError(
            [Issue(Location(""), "executor", "ray is not installed: pip install 'moesim[ray]'")]
        ) from None
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    remote = ray.remote(_run_point)
    pending = {remote.remote(base, p.overrides): (p, d) for p, d in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            p, digest = pending.pop(ref)
            summary, wall = ray.get(ref)
            yield p, digest, summary, wall


EXECUTORS: dict[str, Callable[[str, list[Job], int], Iterator[Done]]] = {
    "process": _process_pool,
    "ray": _ray,
}


def run_sweep(
    path: str | Path,
    workers: int | None = None,
    out: str | Path | None = None,
    fresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or resume) the sweep in ``path``; ``fresh`` ignores finished points."""
    cfg, positions = load_sweep(path)
    base = Path(path).parent / cfg.base
    if not base.is_file():
        loc = positions.get(("base",), Location(str(path)))
        raise ScenarioError([Issue(loc, "base", f"no such scenario file: {str(base)!r}")])
    planned = plan(cfg, base, positions, str(path))
    folder = Path(out if out is not None else cfg.output_dir) / "sweeps" / cfg.name
    points_dir = folder / "points"
    summaries: dict[int, dict[str, Any]] = {}
    todo: list[Job] = []
    for p, digest in planned:
        f = points_dir / f"{p.index:04d}.json"
        if not fresh and f.is_file():
            saved = json.loads(f.read_text("utf-8"))
            if saved.get("scenario_sha256_16") == digest:
                summaries[p.index] = saved["summary"]
                continue
        todo.append((p, digest))
    reused = len(summaries)
    say = progress or (lambda _msg: None)
    say(f"sweep {cfg.name}: {len(planned)} points, {reused} already done, {len(todo)} to run")
    n_workers = workers if workers is not None else cfg.workers
    runner = (
        _in_process if n_workers == 1 and cfg.executor == "process" else EXECUTORS[cfg.executor]
    )
    checked = False
    for k, (p, digest, summary, wall) in enumerate(runner(str(base), todo, n_workers), 1):
        write_json_atomic(
            points_dir / f"{p.index:04d}.json",
            {
                "index": p.index,
                "values": p.values,
                "overrides": list(p.overrides),
                "scenario_sha256_16": digest,
                "wall_s": round(wall, 4),
                "summary": summary,
            },
        )
        summaries[p.index] = summary
        if not checked:
            _check_metrics(cfg, summary, positions, str(path))
            checked = True
        point = ", ".join(f"{key}={json.dumps(v)}" for key, v in p.values.items())
        say(f"[{k}/{len(todo)}] point {p.index} ({point}) {wall:.1f} s")
    points = [p for p, _ in planned]
    rows = [{m: metric(summaries[p.index], m) for m in cfg.metrics} for p in points]
    ok = [feasible(r, cfg.constraints) for r in rows]
    best = front(
        rows,
        cfg.objectives.minimize,
        cfg.objectives.maximize,
        [i for i, f in enumerate(ok) if f],
    )
    result = SweepResult(cfg, folder, points, rows, ok, best, len(todo), reused)
    _write_tables(result)
    return result


def _write_tables(r: SweepResult) -> None:
    keys = list(r.points[0].values) if r.points else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", *keys, *r.config.metrics, "feasible", "pareto"])
    best = set(r.pareto)
    for p, row, ok in zip(r.points, r.rows, r.feasible):
        w.writerow(
            [
                p.index,
                *(json.dumps(p.values[k]) for k in keys),
                *("" if row[m] is None else row[m] for m in r.config.metrics),
                ok,
                p.index in best,
            ]
        )
    write_text_atomic(r.folder / "results.csv", buf.getvalue())
    write_json_atomic(
        r.folder / "sweep.json",
        {
            "sweep": r.config.model_dump(mode="json"),
            "points": [
                {"index": p.index, "values": p.values, "metrics": row, "feasible": ok}
                for p, row, ok in zip(r.points, r.rows, r.feasible)
            ],
            "pareto": r.pareto,
        },
    )
