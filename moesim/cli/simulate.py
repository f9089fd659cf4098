"""The simulating commands: run, compare, check, capacity, sweep."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moesim.errors import EXIT_INTERRUPTED, EXIT_SCENARIO_ERROR


def load(args: argparse.Namespace) -> Any:
    from moesim.loader import load_scenario

    return load_scenario(
        args.scenario, args.overrides, args.seed, allow_paths=args.allow_paths, limits=args.limits
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.api import check_output_dir, run
    from moesim.report.files import dumps

    scenario = load(args)
    if not args.no_write:  # before the run, not after it
        out = args.out if args.out is not None else scenario.output.dir
        check_output_dir(Path(out), "--out" if args.out is not None else "output.dir")
    result = _with_progress(args, scenario.name, lambda: run(scenario))
    run_dir = None if args.no_write else result.write(args.out, report=args.report)
    if run_dir is not None and scenario.workload.kind == "serving":
        from moesim.report.records import write_request_records

        write_request_records(run_dir, result.records, scenario.workload.warmup_s)
    if args.report and run_dir is None:
        print("moesim: --report needs a run folder; ignored with --no-write", file=sys.stderr)
    if args.json:
        print(dumps(result.summary), end="")
        if run_dir is not None:
            print(f"run folder: {run_dir}", file=sys.stderr)
    else:
        print(result.table())
        from moesim.energy.summary import energy_lines

        if result.summary.get("energy"):
            print(energy_lines(result.summary))
        if result.summary.get("failures"):
            from moesim.report.failures import failures_lines

            print(failures_lines(result.summary))
        if run_dir is not None:
            print(f"\nrun folder: {run_dir}")
    return 0


def _with_progress(args: argparse.Namespace, label: str, work: Any) -> Any:
    """``work()`` with a bar of simulated time on a terminal (long serving runs), unless
    ``--quiet``."""
    if getattr(args, "quiet", False):
        return work()
    from moesim.engine.progress import reporting
    from moesim.report.progress import SimulatedTime

    bar = SimulatedTime(label)
    try:
        with reporting(bar.update):
            return work()
    finally:
        bar.close()


def compare(args: argparse.Namespace) -> int:
    from moesim.api import run
    from moesim.loader import load_scenario
    from moesim.report.compare import comparison, normalised, scenario_diff, warnings
    from moesim.report.files import dumps

    opts: dict[str, Any] = {"allow_paths": args.allow_paths, "limits": args.limits}
    a = load_scenario(args.a, args.overrides, args.seed, **opts)
    b = load_scenario(args.b, args.overrides, args.seed, **opts)
    sa, sb = run(a).summary, run(b).summary
    ra, rb = a.model_dump(mode="json"), b.model_dump(mode="json")
    if args.json:
        doc = {
            "a": sa,
            "b": sb,
            "inputs_that_differ": [
                {"field": k, "a": x, "b": y} for k, x, y in scenario_diff(ra, rb)
            ],
            "normalised": {"a": dict(normalised(sa)), "b": dict(normalised(sb))},
            "warnings": warnings(sa, sb, ra, rb),
        }
        print(dumps(doc), end="")
    else:
        print(comparison(sa, sb, ra, rb, args.a, args.b, raw=args.all))
    return 0


def check(args: argparse.Namespace) -> int:
    s = load(args)
    print(f"{args.scenario}: ok ({s.model.name} on {s.cluster.name}, workload {s.workload.kind})")
    return 0


def capacity(args: argparse.Namespace) -> int:
    from moesim.sweep.capacity import Probe, capacity_table, find_capacity, why_infeasible

    if not 0 < args.target <= 1 or args.tolerance <= 0 or args.seeds < 1:
        print(
            "moesim: --target must be in (0, 1], --tolerance > 0 and --seeds >= 1",
            file=sys.stderr,
        )
        return EXIT_SCENARIO_ERROR
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])

    def progress(p: Probe) -> None:
        if not args.json:
            state = "feasible" if p.feasible else "; ".join(why_infeasible(p.summary, args.target))
            print(
                f"  {p.rate_per_s:.4g} req/s: {p.attainment:.1%} within SLO, {state}",
                file=sys.stderr,
                flush=True,
            )

    result = find_capacity(
        args.scenario,
        overrides,
        args.target,
        args.start_rate,
        args.max_rate,
        args.tolerance,
        progress,
        args.seeds,
        allow_paths=args.allow_paths,
        limits=args.limits,
    )
    if args.json:
        from moesim.report.files import dumps

        doc = {
            "target": result.target,
            "capacity_rate_per_s": result.best.rate_per_s if result.best else None,
            "probes": [
                {
                    "rate_per_s": p.rate_per_s,
                    "feasible": p.feasible,
                    "slo_attainment": p.attainment,
                    "summary": p.summary,
                }
                for p in result.probes
            ],
        }
        print(dumps(doc), end="")
    else:
        print(capacity_table(result))
    return 0


def sweep(args: argparse.Namespace) -> int:
    from moesim.sweep import run_sweep
    from moesim.sweep.report import pareto_plot, sweep_table

    if args.workers is not None and args.workers < 1:
        print("moesim: --workers must be >= 1", file=sys.stderr)
        return EXIT_SCENARIO_ERROR

    from moesim.report.progress import Progress

    bar = Progress("sweep")
    try:
        result = run_sweep(
            args.sweep,
            args.workers,
            args.out,
            args.fresh,
            None if args.quiet else bar.message,
            retry_failed=args.retry_failed,
            allow_paths=args.allow_paths,
            limits=args.limits,
        )
    except KeyboardInterrupt:
        print(
            "\nmoesim: interrupted; finished points are saved, run again to resume", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    print(sweep_table(result))
    if result.errors:
        print(
            f"{len(result.errors)} point(s) failed (status and error in results.csv); "
            "rerun with --retry-failed to try them again",
            file=sys.stderr,
        )
    if pareto_plot(result, result.folder / "pareto.png"):
        print(f"Pareto plot: {result.folder / 'pareto.png'}")
    return 0
