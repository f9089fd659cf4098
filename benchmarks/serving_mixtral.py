"""Benchmark: one simulated hour of Mixtral-8x7B serving at 20 requests/s on a DGX H100.

The scenario is ``scenarios/mixtral-serving-dgx-h100.yaml`` (EP=8, dp=8) with
``duration_s`` set to 3600. Prints wall time, iterations, simulation events, events per
wall second and simulated seconds per wall second. The issue's target: under 60 s of wall
time on one core. Not part of the test suite; results are recorded in
``docs/performance.md``.

    .venv/bin/python benchmarks/serving_mixtral.py [--duration-s 3600]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import moesim
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
    t0 = time.perf_counter()
    system = build_system(scenario)
    records = simulate_serving(system)
    t1 = time.perf_counter()
    summary = serving_summary(system, records)
    wall = t1 - t0
    events = records.sim_events
    print(f"simulated            {records.end_s:.1f} s ({summary['arrived_requests']} requests)")
    print(f"wall                 {wall:.2f} s (summary {time.perf_counter() - t1:.2f} s more)")
    print(f"iterations           {summary['iterations']}")
    print(f"events               {events} ({events / wall:,.0f} per wall second)")
    print(f"simulated s / wall s {records.end_s / wall:.1f}")
    print(f"MoE cost evaluations {records.moe_evaluations}")
    print(f"throughput           {summary['throughput_tokens_per_s']} output tokens/s")
    print(f"TTFT p50 / TPOT p50  {summary['ttft_ms']['p50']} / {summary['tpot_ms']['p50']} ms")


if __name__ == "__main__":
    main()
