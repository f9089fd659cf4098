"""Benchmark: a 1000-point layer sweep on 2 worker processes.

The sweep varies the quick-start layer (``scenarios/quickstart.yaml``: Mixtral-8x7B, EP=8
on a DGX H100) over 10 routing skews x 10 capacity factors x 10 token counts, written to
a temporary folder. Prints the wall and CPU time of validating every point (the main
process) and of the whole sweep, and points per wall second. Issue 15's target: the
1000 points in <= 30 s of wall time on 2 workers. Not part of the test suite; results go
in ``docs/performance.md``.

    .venv/bin/python benchmarks/sweep_layer.py [--workers 2] [--points-per-axis 10]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from moesim.sweep.runner import load_sweep, plan, run_sweep

QUICKSTART = Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml"


def sweep_text(n: int) -> str:
    """A sweep of ``n`` x ``n`` x ``n`` points over the quick-start layer."""
    skews = [round(0.2 * i, 2) for i in range(n)]
    factors = [round(1.0 + 0.25 * i, 2) for i in range(n)]
    tokens = [1024 * (i + 1) for i in range(n)]
    return (
        "name: layer-bench\n"
        f"base: {QUICKSTART}\n"
        "grid:\n"
        f"  routing.s: {skews}\n"
        f"  policies.capacity_factor: {factors}\n"
        f"  workload.tokens: {tokens}\n"
        "metrics: [time_ms, dropped_fraction]\n"
        "objectives: {minimize: [time_ms]}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--points-per-axis", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(sweep_text(args.points_per_axis))
        cfg, positions = load_sweep(path)
        t0, c0 = time.perf_counter(), time.process_time()
        planned = plan(cfg, QUICKSTART, positions, str(path))
        t1, c1 = time.perf_counter(), time.process_time()
        result = run_sweep(path, workers=args.workers, out=Path(tmp) / "out")
        t2, c2 = time.perf_counter(), time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(planned)
    print(f"points               {n} ({result.ran} ran, {len(result.errors)} failed)")
    print(f"validate (main)      {t1 - t0:.2f} s wall, {c1 - c0:.2f} s CPU")
    print(f"sweep                {t2 - t1:.2f} s wall ({n / (t2 - t1):.1f} points/s)")
    print(f"  main process CPU   {c2 - c1:.2f} s")
    print(f"  workers' CPU       {children.ru_utime + children.ru_stime:.2f} s")
    verdict = "met" if t2 - t1 <= 30 else "missed"
    print(f"target <= 30 s wall on {args.workers} workers: {verdict}")


if __name__ == "__main__":
    main()
