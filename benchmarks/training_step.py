"""Benchmark: wall time of one simulated training step, by scenario and size.

Run: ``python benchmarks/training_step.py``. Prints wall seconds, simulated step time,
pipeline events and the distinct MoE layer simulations each run needed. Results go in
docs/performance.md (not a timed test).
"""

from __future__ import annotations

import time

import moesim

CASES = [
    ("scenarios/mixtral-training-h100.yaml", []),
    ("scenarios/switch-base-training-tpu-v3.yaml", []),
    ("scenarios/glam-training-tpu-v4.yaml", ["cluster.dims=[4,4,4]", "parallelism.dp=8"]),
    ("scenarios/glam-training-tpu-v4.yaml", []),
]


def main() -> None:
    for path, overrides in CASES:
        scenario = moesim.load_scenario(path, overrides)
        t0 = time.perf_counter()
        summary = moesim.run(scenario).summary
        wall = time.perf_counter() - t0
        ev = summary["events"]
        print(
            f"{scenario.name:<32} devices {summary['devices']:>4}  wall {wall:7.2f} s  "
            f"step {summary['step_time_ms']:10.1f} ms  pipeline events {ev['pipeline']:>6}  "
            f"layer simulations {ev['layer_evaluations']}"
        )


if __name__ == "__main__":
    main()
