"""Benchmark: CPU time of DeepSeek-V3 MoE layers on DeepEP (the production scenario's shapes).

Run: ``python benchmarks/deepep_layers.py`` (``--repeat N``). Two layers of
``scenarios/deepseek-v3-production-h800.yaml``: a decode layer of the EP144 pool (18 H800
nodes, 128 sequences per GPU, 32 redundant experts, CUDA graphs) and a prefill layer of an
EP32 instance (4 nodes, 16,384 tokens per GPU), each one ``layer`` workload run (routing
+ one simulated layer), and one evaluation of the decode pool's memoized layer cost at a
9,216-token bucket (``MoELayerCost``: up to 3 routed samples, what a serving run prices per
bucket). Prints CPU seconds (best of ``--repeat``), SimPy events, the layer's
time and its dispatch / combine on the critical path. Runs on older trees too (without
``parallelism.a2a_mode`` it leaves the mode out), so a before/after is this script run in
both. Results go in docs/fidelity/deepep.md (not a timed test).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import moesim
from moesim.config.parallelism import ParallelismConfig
from moesim.loader import scenario_from_dict

MODES = "a2a_mode" in ParallelismConfig.model_fields

CASES: list[tuple[str, int, int, str]] = [
    # name, nodes, tokens per GPU, DeepEP mode
    ("decode EP144", 18, 128, "low_latency"),
    ("decode EP144", 18, 128, "normal"),
    ("prefill EP32", 4, 16384, "normal"),
]


def scenario(nodes: int, tokens_per_gpu: int, mode: str) -> Any:
    ep = nodes * 8
    parallelism: dict[str, Any] = {"dp": ep, "ep": ep, "a2a": "deepep"}
    if MODES:
        parallelism["a2a_mode"] = mode
    return scenario_from_dict(
        {
            "name": f"deepep-ep{ep}",
            "seed": 6,
            "cluster": {"preset": "h800-rail", "nodes": nodes, "launch": "graph"},
            "model": "deepseek-v3",
            "routing": {"kind": "hot", "hot_fraction": 0.0078125, "hot_share": 0.0586},
            "parallelism": parallelism,
            "policies": {"overflow": "dropless", "experts": {"redundant": 32}},
            "workload": {"kind": "layer", "tokens": tokens_per_gpu * ep},
        }
    )


def cost_evaluation(tokens: int, mode: str) -> tuple[float, int, float]:
    """CPU seconds, SimPy events and the time of one MoE-layer cost evaluation."""
    from moesim.cost.layer_cost import MoELayerCost
    from moesim.engine.layer_sim import layer_run
    from moesim.system import build_system

    system = build_system(scenario(18, 128, mode))
    cost = MoELayerCost(system, layer_run)
    t0 = time.process_time()
    t = cost.sample(tokens).time_s
    return time.process_time() - t0, cost.sim_events, t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    for name, nodes, tokens, mode in CASES:
        if not MODES and mode != "normal":
            continue
        s = scenario(nodes, tokens, mode)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.process_time()
            summary = moesim.run(s).summary
            best = min(best, time.process_time() - t0)
        b = summary["breakdown_ms"]
        label = f"{name} {mode if MODES else '(no modes)'}"
        print(
            f"{label:<28} cpu {best:7.2f} s  events {summary['events']['simulation']:>7}  "
            f"layer {summary['time_ms']:8.3f} ms  dispatch {b['dispatch']:7.3f} ms  "
            f"combine {b['combine']:7.3f} ms"
        )
    for mode in ("low_latency", "normal") if MODES else ("normal",):
        cpu, events, t = min(cost_evaluation(9216, mode) for _ in range(args.repeat))
        label = f"cost EP144 9216 {mode if MODES else '(no modes)'}"
        print(f"{label:<28} cpu {cpu:7.2f} s  events {events:>7}  layer {t * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
