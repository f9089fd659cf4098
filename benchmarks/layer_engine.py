"""Benchmark: the layer engine (one MoE layer on the cluster) by scenario.

Run: ``python benchmarks/layer_engine.py``. Prints, per scenario, the wall time, the SimPy
events and network re-ratings, events per wall second, and simulated seconds per wall
second. Results go in docs/performance.md (not a timed test).
"""

from __future__ import annotations

import time
from pathlib import Path

import moesim

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    ("scenarios/quickstart.yaml", []),
    ("scenarios/hot-expert-teaching.yaml", []),
    ("scenarios/switch-base-tpu-v3.yaml", []),
    ("scenarios/mixtral-etp-h100-fat-tree.yaml", []),
    ("scenarios/deepseek-v3-ep32-h800.yaml", []),
    ("scenarios/deepseek-v3-ep32-h800.yaml", ["parallelism.a2a=deepep"]),
]


def main() -> None:
    for path, overrides in CASES:
        scenario = moesim.load_scenario(str(ROOT / path), overrides)
        t0 = time.perf_counter()
        summary = moesim.run(scenario).summary
        wall = time.perf_counter() - t0
        ev = summary["events"]
        sim_s = summary["time_ms"] * 1e-3
        label = scenario.name + (" " + " ".join(overrides) if overrides else "")
        print(
            f"{label:<52} devices {summary['devices']:>3}  wall {wall:6.3f} s  "
            f"events {ev['simulation']:>6} ({ev['simulation'] / wall:8.0f}/s)  "
            f"re-ratings {ev['network_rate_updates']:>5}  "
            f"sim s / wall s {sim_s / wall:.2e}"
        )


if __name__ == "__main__":
    main()
