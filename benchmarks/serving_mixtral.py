"""Benchmark: one simulated hour of Mixtral-8x7B serving at 20 requests/s on a DGX H100.

The scenario is ``scenarios/mixtral-serving-dgx-h100.yaml`` (EP=8, dp=8) with
``duration_s`` set to 3600. Prints wall and CPU time (building the system plus the
simulation), peak memory (the process's maximum resident set), iterations, simulation
events, events per wall second, simulated seconds per wall second, and the time spent
pricing MoE layer buckets. Issue 15's target: <= 10 s of CPU for the hour. Not part of the
test suite; results are recorded in ``docs/performance.md``.

    .venv/bin/python benchmarks/serving_mixtral.py [--duration-s 3600]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import moesim
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.engine.serving import simulate_serving
from moesim.report.serving import serving_summary
from moesim.system import build_system

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "mixtral-serving-dgx-h100.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=3600.0)
    ap.add_argument("--rate-per-s", type=float, default=20.0)
    args = ap.parse_args()
    scenario = moesim.load_scenario(
        SCENARIO,
        [
            f"workload.duration_s={args.duration_s}",
            f"workload.arrival.rate_per_s={args.rate_per_s}",
        ],
    )
    t0, c0 = time.perf_counter(), time.process_time()
    system = build_system(scenario)
    moe_cost = simulated_layer_cost(system)
    moe_cpu = [0.0]
    price = moe_cost._at  # time the MoE bucket pricing (each bucket once, then memoized)

    def timed(tokens: int) -> Any:
        c = time.process_time()
        try:
            return price(tokens)
        finally:
            moe_cpu[0] += time.process_time() - c

    moe_cost._at = timed  # type: ignore[method-assign]
    records = simulate_serving(system, moe_cost)
    t1, c1 = time.perf_counter(), time.process_time()
    summary = serving_summary(system, records)
    wall, cpu = t1 - t0, c1 - c0
    events = records.sim_events
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    print(f"simulated            {records.end_s:.1f} s ({summary['arrived_requests']} requests)")
    print(f"wall                 {wall:.2f} s (summary {time.perf_counter() - t1:.2f} s more)")
    print(f"CPU                  {cpu:.2f} s")
    print(f"peak memory          {peak_mib:.0f} MiB (maximum resident set of the process)")
    print(f"iterations           {summary['iterations']}")
    print(f"events               {events} ({events / wall:,.0f} per wall second)")
    print(f"simulated s / wall s {records.end_s / wall:.1f}")
    print(f"MoE cost evaluations {records.moe_evaluations} ({moe_cpu[0]:.2f} s CPU pricing them)")
    print(f"throughput           {summary['throughput_tokens_per_s']} output tokens/s")
    print(f"TTFT p50 / TPOT p50  {summary['ttft_ms']['p50']} / {summary['tpot_ms']['p50']} ms")


if __name__ == "__main__":
    main()
