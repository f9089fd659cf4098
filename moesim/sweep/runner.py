"""Run a sweep: validate every point first, run the missing ones on a process pool (or a
Ray cluster), write each result atomically as it finishes, then tabulate.

Layout of ``<output_dir>/sweeps/<name>/``:

- ``points/NNNN.json``: one finished point (its varied values, overrides, the digest of
  its resolved scenario, ``status`` and its full summary, or ``status: failed`` and the
  ``error``; no wall time, so the file does not depend on the machine or ``--workers``).
  A point whose file exists with the same scenario digest is not run again, so an
  interrupted sweep resumes where it stopped, and editing the base scenario reruns exactly
  the points it changes.
- ``results.csv``: one row per point: varied fields, metrics, feasible, pareto, status,
  error. A failed point stays failed on a rerun unless ``retry_failed`` is set.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moesim.config.sweep import SweepConfig
from moesim.cost.cost_store import LAYER_COST_KEYS
from moesim.errors import Issue, Location, ScenarioError
from moesim.loader.yamlpos import Positions
from moesim.report.feasibility import judge
from moesim.report.fields import scalars
from moesim.report.files import file_in_the_way, write_json_atomic, write_text_atomic
from moesim.sweep.pareto import front, metric
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
    errors: dict[int, str] = field(default_factory=dict)
    """The error of each point that failed (by index); their metrics are None."""
    reasons: list[str] = field(default_factory=list)
    """Per point: why it is infeasible (:mod:`moesim.report.feasibility`), or "feasible"."""


def load_sweep(path: str | Path) -> tuple[SweepConfig, Positions]:
    """Read and validate a sweep file (located errors, as for scenarios)."""
    from moesim.loader.resolve import read_mapping
    from moesim.loader.validate import validate_as

    data, positions = read_mapping(path, "a sweep")
    return validate_as(SweepConfig, data, positions, str(path)), positions


def _digest(scenario: Any) -> str:
    resolved = json.dumps(scenario.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(resolved.encode()).hexdigest()[:16]


def plan(
    cfg: SweepConfig, base: Path, positions: Positions, file: str, opts: Options | None = None
) -> list[tuple[Point, str]]:
    """Every point validated (all problems at once, located at the sweep key that made
    them), with the digest of its resolved scenario."""
    from moesim.loader import load_scenario

    opts = opts or Options()
    out, issues = [], []
    for p in expand(cfg):
        try:
            s = load_scenario(
                base, list(p.overrides), allow_paths=opts.allow_paths, limits=opts.limits
            )
            out.append((p, _digest(s)))
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


def _run_point(
    base: str,
    overrides: tuple[str, ...],
    costs: dict[str, Any] | None = None,
    allow_paths: tuple[str, ...] = (),
    limits: bool = True,
    cost_cache: str | None = None,
) -> tuple[dict[str, Any], float]:
    """One point's outcome and wall time (runs in a worker process): ``{"status": "ok",
    "summary": ...}`` or ``{"status": "failed", "error": ...}`` (a point that fails does
    not stop the sweep). ``costs`` memoizes serving points' MoE layer costs by the sections
    they depend on (in-process runs); ``cost_cache`` is a folder of priced layer buckets
    shared by the sweep's processes (:mod:`moesim.cost.cost_store`). A point's summary is
    the same with or without either."""
    from moesim.cost.cost_store import store_in

    t0 = time.perf_counter()
    try:
        with store_in(cost_cache):
            summary = _simulate_point(base, overrides, costs, allow_paths, limits)
        outcome: dict[str, Any] = {"status": "ok", "summary": summary}
    except ScenarioError as exc:
        outcome = {"status": "failed", "error": "; ".join(str(i) for i in exc.issues)}
    except Exception as exc:  # a crash of one point must not end the sweep
        first = (str(exc).splitlines() or [""])[0][:300]
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {first}".rstrip(": ")}
    return outcome, time.perf_counter() - t0


def _simulate_point(
    base: str,
    overrides: tuple[str, ...],
    costs: dict[str, Any] | None,
    allow_paths: tuple[str, ...],
    limits: bool,
) -> dict[str, Any]:
    from moesim.api import run
    from moesim.engine.layer_sim import simulated_layer_cost
    from moesim.loader import load_scenario
    from moesim.system import build_system
    from moesim.workloads import kind_of

    scenario = load_scenario(base, list(overrides), allow_paths=allow_paths, limits=limits)
    moe_cost = None
    if costs is not None and kind_of(scenario).shares_layer_cost():
        dump = scenario.model_dump(mode="json", include=set(LAYER_COST_KEYS))
        key = hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
        system = build_system(scenario)
        if key not in costs:
            costs[key] = simulated_layer_cost(system)
        moe_cost = costs[key].sharing(system)
    return run(scenario, moe_cost=moe_cost).summary


@dataclass(frozen=True)
class Options:
    """How points are loaded (as ``load_scenario``'s keywords)."""

    allow_paths: tuple[str, ...] = ()
    limits: bool = True
    cost_cache: str | None = None
    """A folder of priced MoE layer buckets the points share (None: none)."""


Job = tuple[Point, str]


def _job_args(base: str, p: Point, opts: Options) -> tuple[Any, ...]:
    """:func:`_run_point`'s arguments for a point run in another process."""
    return (base, p.overrides, None, opts.allow_paths, opts.limits, opts.cost_cache)


Done = tuple[Point, str, dict[str, Any], float]


def _in_process(base: str, jobs: list[Job], workers: int, opts: Options) -> Iterator[Done]:
    costs: dict[str, Any] = {}  # shared MoE layer costs, for this sweep only
    for p, digest in jobs:
        args = (opts.allow_paths, opts.limits, opts.cost_cache)
        outcome, wall = _run_point(base, p.overrides, costs, *args)
        yield p, digest, outcome, wall


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent (which stops them), so none prints a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_pool(base: str, jobs: list[Job], workers: int, opts: Options) -> Iterator[Done]:
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
    try:
        pending = {pool.submit(_run_point, *_job_args(base, p, opts)): (p, d) for p, d in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: pending[f][0].index):
                p, digest = pending.pop(fut)
                try:
                    outcome, wall = fut.result()
                except Exception as exc:  # the worker died (out of memory, killed)
                    outcome = {"status": "failed", "error": f"worker failed: {type(exc).__name__}"}
                    wall = 0.0
                yield p, digest, outcome, wall
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # an interrupted sweep stops its points now, not when they end
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _ray(base: str, jobs: list[Job], workers: int, opts: Options) -> Iterator[Done]:
    try:
        import ray
    except ImportError:
        raise ScenarioError(
            [Issue(Location(""), "executor", "ray is not installed: pip install 'moesim[ray]'")]
        ) from None
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    remote = ray.remote(_run_point)
    pending = {remote.remote(*_job_args(base, p, opts)): (p, d) for p, d in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            p, digest = pending.pop(ref)
            outcome, wall = ray.get(ref)
            yield p, digest, outcome, wall


EXECUTORS: dict[str, Callable[[str, list[Job], int, Options], Iterator[Done]]] = {
    "process": _process_pool,
    "ray": _ray,
}


@dataclass(frozen=True)
class RunSettings:
    """How a set of points runs: workers, executor, load options, what to rerun."""

    workers: int = 1
    executor: str = "process"
    opts: Options = field(default_factory=Options)
    fresh: bool = False
    retry_failed: bool = False


def run_points(
    base: str,
    planned: list[Job],
    points_dir: Path,
    settings: RunSettings,
    label: str,
    progress: Callable[[str], None] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[int, dict[str, Any]], int, int]:
    """Run the points of ``planned`` that ``points_dir`` does not hold yet (same scenario
    digest), each written atomically as ``NNNN.json`` when it finishes; returns every
    point's record by index, and how many ran and were reused. Shared by sweeps and plans."""
    outcomes: dict[int, dict[str, Any]] = {}
    todo: list[Job] = []
    for p, digest in planned:
        saved = None if settings.fresh else _saved(points_dir / f"{p.index:04d}.json")
        if saved is not None and saved.get("scenario_sha256_16") == digest:
            failed = saved.get("status") == "failed"
            if not (failed and settings.retry_failed):
                outcomes[p.index] = saved
                continue
        todo.append((p, digest))
    reused = len(outcomes)
    n_failed_before = sum(1 for o in outcomes.values() if o.get("status") == "failed")
    say = progress or (lambda _msg: None)
    kept = f" ({n_failed_before} failed: --retry-failed reruns them)" if n_failed_before else ""
    say(f"{label}: {len(planned)} points, {reused} already done{kept}, {len(todo)} to run")
    n = settings.workers
    runner = (
        _in_process if n == 1 and settings.executor == "process" else EXECUTORS[settings.executor]
    )
    # the points' processes share their priced MoE layer buckets beside the points
    opts = settings.opts
    if opts.cost_cache is None:
        opts = replace(opts, cost_cache=str(points_dir.parent / "cost-cache"))
    for k, (p, digest, outcome, wall) in enumerate(runner(base, todo, n, opts), 1):
        record = {
            "index": p.index,
            "values": p.values,
            "overrides": list(p.overrides),
            "scenario_sha256_16": digest,
            **outcome,
        }
        write_json_atomic(points_dir / f"{p.index:04d}.json", record)
        outcomes[p.index] = record
        if on_done is not None:
            on_done(outcome)
        point = ", ".join(f"{key}={json.dumps(v)}" for key, v in p.values.items())
        state = "" if outcome["status"] == "ok" else f" FAILED: {outcome['error']}"
        say(f"[{k}/{len(todo)}] point {p.index} ({point}) {wall:.1f} s{state}")
    return outcomes, len(todo), reused


def run_sweep(
    path: str | Path,
    workers: int | None = None,
    out: str | Path | None = None,
    fresh: bool = False,
    progress: Callable[[str], None] | None = None,
    retry_failed: bool = False,
    allow_paths: tuple[str, ...] | list[str] = (),
    limits: bool = True,
) -> SweepResult:
    """Run (or resume) the sweep in ``path``; ``fresh`` ignores finished points,
    ``retry_failed`` reruns the points that failed (by default they stay failed);
    ``allow_paths`` and ``limits`` as for :func:`moesim.loader.load_scenario`."""
    opts = Options(tuple(str(a) for a in allow_paths), limits)
    cfg, positions = load_sweep(path)
    base = Path(path).parent / cfg.base
    if not base.is_file():
        loc = positions.get(("base",), Location(str(path)))
        raise ScenarioError([Issue(loc, "base", f"no such scenario file: {str(base)!r}")])
    planned = plan(cfg, base, positions, str(path), opts)
    folder = Path(out if out is not None else cfg.output_dir) / "sweeps" / cfg.name
    _check_folder(folder, "--out" if out is not None else "output_dir", positions, str(path))
    n_workers = workers if workers is not None else cfg.workers
    checked = False

    def check(outcome: dict[str, Any]) -> None:
        nonlocal checked
        if not checked and outcome["status"] == "ok":
            _check_metrics(cfg, outcome["summary"], positions, str(path))
            checked = True

    outcomes, ran, reused = run_points(
        str(base),
        planned,
        folder / "points",
        RunSettings(n_workers, cfg.executor, opts, fresh, retry_failed),
        f"sweep {cfg.name}",
        progress,
        check,
    )
    points = [p for p, _ in planned]
    rows = [
        {m: metric(outcomes[p.index].get("summary") or {}, m) for m in cfg.metrics} for p in points
    ]
    errors = {
        p.index: str(outcomes[p.index].get("error", ""))
        for p in points
        if outcomes[p.index].get("status") == "failed"
    }
    verdicts = [
        judge(outcomes[p.index].get("summary"), errors.get(p.index), cfg.constraints)
        for p in points
    ]
    ok = [v.feasible for v in verdicts]
    best = front(
        rows,
        cfg.objectives.minimize,
        cfg.objectives.maximize,
        [i for i, f in enumerate(ok) if f],
    )
    result = SweepResult(
        cfg, folder, points, rows, ok, best, ran, reused, errors, [v.reason for v in verdicts]
    )
    _write_tables(result)
    return result


def _saved(f: Path) -> dict[str, Any] | None:
    """A point file written earlier (None when missing or unreadable: rerun it)."""
    try:
        saved = json.loads(f.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("status", "ok") not in ("ok", "failed"):
        return None
    if saved.get("status", "ok") == "ok" and not isinstance(saved.get("summary"), dict):
        return None
    return {"status": "ok", **saved}


def _check_folder(folder: Path, named: str, positions: Positions, file: str) -> None:
    """The sweep folder (and every existing folder above it) must be a folder."""
    p = file_in_the_way(folder)
    if p is not None:
        loc = (
            Location("--out")
            if named == "--out"
            else positions.get(("output_dir",), Location(file))
        )
        raise ScenarioError([Issue(loc, named, f"{str(p)!r} is a file, not a folder")])


def flat_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A point's varied values as flat columns: a mapping becomes one column per field
    (``cluster.preset``, ``cluster.launch``), a list its items separated by spaces."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_values(v, f"{key}."))
        elif isinstance(v, list):
            out[key] = " ".join(str(x) for x in v)
        else:
            out[key] = "" if v is None else v
    return out


def _write_tables(r: SweepResult) -> None:
    flat = [flat_values(p.values) for p in r.points]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["point", *keys, *r.config.metrics, "feasible", "reason", "pareto", "status", "error"]
    w.writerow(head)
    best = set(r.pareto)
    reasons = r.reasons or ["" for _ in r.points]
    for p, f, row, ok, why in zip(r.points, flat, r.rows, r.feasible, reasons):
        w.writerow(
            [
                p.index,
                *(f.get(k, "") for k in keys),
                *("" if row[m] is None else row[m] for m in r.config.metrics),
                ok,
                why,
                p.index in best,
                "failed" if p.index in r.errors else "ok",
                r.errors.get(p.index, ""),
            ]
        )
    write_text_atomic(r.folder / "results.csv", buf.getvalue())
    write_json_atomic(
        r.folder / "sweep.json",
        {
            "sweep": r.config.model_dump(mode="json"),
            "points": [
                {
                    "index": p.index,
                    "values": p.values,
                    "metrics": row,
                    "feasible": ok,
                    "reason": why,
                    "status": "failed" if p.index in r.errors else "ok",
                    **({"error": r.errors[p.index]} if p.index in r.errors else {}),
                }
                for p, row, ok, why in zip(r.points, r.rows, r.feasible, reasons)
            ],
            "pareto": r.pareto,
        },
    )
