"""DeepEP's published kernel tables, each row simulated by moesim's DeepEP exchange.

``python -m moesim.calibrate.deepep_fit`` prints every row (published, moesim, error) and
which rows the kernel constants of :mod:`moesim.cost.deepep` were fitted on;
``--fit`` refits them on those rows (least squares on the relative error) and prints the
constants. Each row is DeepEP's own benchmark replayed: its tokens per rank, hidden size,
top-8 routing of uniform random scores (normal kernels: limited to ``min(nodes, 4)``
nodes per token, one expert group per node, as ``tests/test_internode.py``), FP8 dispatch
and BF16 combine, on ``h800-rail`` (8 H800 per node on NVLink, one 400 Gb/s NIC per GPU on
a rail-optimized InfiniBand fabric); every rank starts the kernel at once, and a rank's
kernel ends when its own messages and those it receives have arrived. The figure compared
is DeepEP's: the mean over ranks of the latency (low-latency kernels), or of the logical
bytes over the time (normal kernels: tokens x nodes reached, own node included, for RDMA;
tokens received, own included, for NVLink).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simpy

from moesim import rng
from moesim.config.parallelism import DeepEPMode
from moesim.cost.deepep import (
    DeepEPKernel,
    combine_bytes_per_token,
    dispatch_bytes_per_token,
    kernel,
)
from moesim.engine.deepep import DeepEPExchange, Traffic, layer_exchanges, traffic
from moesim.engine.moe_layer import traffic_arrays
from moesim.engine.network import BatchedFlowNetwork
from moesim.loader import scenario_from_dict
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System, build_system
from moesim.units import US

Phase = Literal["dispatch", "combine"]

NORMAL_SOURCE = (
    "github.com/deepseek-ai/DeepEP README, commit 3b1045d (2025-04-22), 'Normal kernels with "
    "NVLink and RDMA forwarding': H800, CX7 400 Gb/s, 4096 tokens per rank, hidden 7168, "
    "top-4 groups, top-8 experts, FP8 dispatch, BF16 combine; bottleneck bandwidth, GB/s"
)
LOW_LATENCY_SOURCE = (
    "github.com/deepseek-ai/DeepEP README, commit de8cfca (2025-06-05, with #173: NVLink "
    "inside the node), 'Low-latency kernels': H800, CX7 400 Gb/s, 128 tokens per rank, "
    "hidden 7168, top-8 experts, FP8 dispatch, BF16 combine; latency, us"
)


@dataclass(frozen=True)
class Row:
    """One published figure: GB/s (normal kernels) or microseconds (low-latency)."""

    mode: DeepEPMode
    ep: int
    phase: Phase
    published: float
    fit: bool
    """Whether the kernel constants were fitted on this row (else it is held out)."""

    @property
    def unit(self) -> str:
        return "GB/s" if self.mode == "normal" else "us"


ROWS: tuple[Row, ...] = (
    Row("normal", 8, "dispatch", 153.0, False),
    Row("normal", 8, "combine", 158.0, False),
    Row("normal", 16, "dispatch", 43.0, False),
    Row("normal", 16, "combine", 43.0, False),
    Row("normal", 32, "dispatch", 58.0, True),
    Row("normal", 32, "combine", 57.0, True),
    Row("normal", 64, "dispatch", 51.0, False),
    Row("normal", 64, "combine", 50.0, False),
    Row("low_latency", 8, "dispatch", 77.0, False),
    Row("low_latency", 8, "combine", 114.0, False),
    Row("low_latency", 16, "dispatch", 118.0, True),
    Row("low_latency", 16, "combine", 195.0, True),
    Row("low_latency", 32, "dispatch", 155.0, False),
    Row("low_latency", 32, "combine", 273.0, False),
    Row("low_latency", 64, "dispatch", 173.0, False),
    Row("low_latency", 64, "combine", 314.0, False),
    Row("low_latency", 128, "dispatch", 192.0, True),
    Row("low_latency", 128, "combine", 369.0, True),
    Row("low_latency", 256, "dispatch", 194.0, False),
    Row("low_latency", 256, "combine", 360.0, False),
)


Bench = tuple[System, LayerRouting, Traffic]
"""One DeepEP benchmark setting, routed once (both phases share it)."""


def _bench(mode: DeepEPMode, ep: int, seed: int = 0) -> Bench:
    nodes = max(1, ep // 8)
    if mode == "normal":  # tests/test_internode.py, test_intranode.py
        experts, tokens = (256 // ep) * ep, 4096
        groups: dict[str, object] = {"expert_groups": nodes, "topk_groups": min(nodes, 4)}
        if nodes == 1:
            groups = {"expert_groups": None, "topk_groups": None}
    else:  # tests/test_low_latency.py: 288 experts where they divide (else 256), no groups
        experts, tokens = (288 if 288 % ep == 0 else 256), 128
        groups = {"expert_groups": None, "topk_groups": None}
    s = scenario_from_dict(
        {
            "name": f"deepep-{mode}-ep{ep}",
            "seed": seed,
            "cluster": {"preset": "h800-rail", "nodes": nodes},
            "model": {"preset": "deepseek-v3", "experts": experts, **groups},
            "routing": {"kind": "uniform"},
            "parallelism": {"dp": ep, "ep": ep, "a2a": "deepep", "a2a_mode": mode},
            "policies": {"capacity_factor": None, "overflow": "dropless"},
            "workload": {"kind": "layer", "tokens": tokens * ep},
        }
    )
    system = build_system(s)
    routing = route_layer(
        rng.stream(seed, "deepep-bench", ep),
        np.full(experts, 1.0 / experts),
        system.layout,
        tokens * ep,
        s.model,
        s.policies,
        system.expert_node,
    )
    src, dst, slots, _ = traffic_arrays(routing, system.layout, 0)
    t = traffic(routing, system.layout, 0, system.topology, src, dst, slots)
    return system, routing, t


def _phase_times(system: System, t: Traffic, k: DeepEPKernel, phase: Phase) -> np.ndarray:
    """Each rank's kernel time in one phase, all ranks starting at 0."""
    env = simpy.Environment()
    net = BatchedFlowNetwork(env, system.paths)
    dispatch, combine = layer_exchanges(env, net, k, system.scenario.model, t)
    ex: DeepEPExchange = dispatch if phase == "dispatch" else combine
    for s in np.unique(ex.sender).tolist():
        ex.send(s)
    env.run()
    devices = len(system.topology.devices)
    end = np.zeros(devices)
    np.maximum.at(end, ex.receiver, ex.arrived)
    np.maximum.at(end, ex.sender, ex.arrived)
    return end


def simulate(
    row: Row, k: DeepEPKernel | None = None, cache: dict[tuple[str, int], Bench] | None = None
) -> float:
    """moesim's figure for one row (GB/s or us, as published)."""
    key = (row.mode, row.ep)
    bench = cache.get(key) if cache is not None else None
    if bench is None:
        bench = _bench(row.mode, row.ep)
        if cache is not None:
            cache[key] = bench
    system, routing, t = bench
    k = k or kernel(row.mode)
    end = _phase_times(system, t, k, row.phase)
    if row.mode == "low_latency":
        return float(end.mean() / US)
    d = system.scenario.model.d_model
    width = (
        dispatch_bytes_per_token(d, "fp8", "normal")
        if row.phase == "dispatch"
        else combine_bytes_per_token(d)
    )
    if row.ep <= 8:  # NVLink: tokens received, own included
        tokens = np.zeros(len(end))
        np.add.at(tokens, t.dst, t.gpu_tokens)
    else:  # RDMA: tokens x nodes reached, own node included
        assert routing.node_tokens is not None
        tokens = routing.node_tokens.sum(axis=1).astype(float)
    return float(np.mean(tokens * width / end[: len(tokens)]) / 1e9)


def report(k_normal: DeepEPKernel | None = None, k_ll: DeepEPKernel | None = None) -> list[dict]:
    """Every row: published, moesim, relative error, fitted or held out."""
    cache: dict[tuple[str, int], Bench] = {}
    out = []
    for row in ROWS:
        k = (k_normal if row.mode == "normal" else k_ll) or kernel(row.mode)
        got = simulate(row, k, cache)
        out.append(
            {
                "mode": row.mode,
                "ep": row.ep,
                "phase": row.phase,
                "unit": row.unit,
                "published": row.published,
                "moesim": got,
                "error": got / row.published - 1,
                "fit": row.fit,
            }
        )
    return out


def fit(mode: DeepEPMode, latency_from: DeepEPKernel | None = None) -> DeepEPKernel:
    """Least squares on the relative error of one mode's fit rows: the RDMA efficiency and,
    unless ``latency_from`` gives them, the dispatch and combine latencies (a grid, then
    refined by halving steps). The normal kernels' published rows (~2 ms calls) cannot
    identify a latency of tens of microseconds, so theirs come from the low-latency fit."""
    rows = [r for r in ROWS if r.mode == mode and r.fit]
    cache: dict[tuple[str, int], Bench] = {}
    base = kernel(mode)
    free = (0, 1, 2) if latency_from is None else (0,)
    ld0 = 0.0 if latency_from is None else latency_from.dispatch_latency_s / US
    lc0 = 0.0 if latency_from is None else latency_from.combine_latency_s / US

    def make(x: list[float]) -> DeepEPKernel:
        return dataclasses.replace(
            base, rdma_efficiency=x[0], dispatch_latency_s=x[1] * US, combine_latency_s=x[2] * US
        )

    def cost(x: list[float]) -> float:
        return sum((simulate(r, make(x), cache) / r.published - 1) ** 2 for r in rows)

    lat = np.arange(0.0, 41.0, 10.0) if latency_from is None else np.array([ld0])
    grid = [
        [float(eta), float(ld), float(ld) if latency_from is None else lc0]
        for eta in np.arange(0.70, 1.001, 0.05)
        for ld in lat
    ]
    x = min(grid, key=cost)
    c = cost(x)
    step = [0.025, 5.0, 5.0]
    for _ in range(5):
        for i in free:
            for sign in (-1, 1):
                trial = list(x)
                trial[i] = max(0.0, trial[i] + sign * step[i])
                ct = cost(trial)
                if ct < c:
                    c, x = ct, trial
        step = [v / 2 for v in step]
    return make(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", action="store_true", help="refit the constants on the fit rows")
    args = p.parse_args(argv)
    kn = kl = None
    if args.fit:
        kl = fit("low_latency")
        kn = fit("normal", latency_from=kl)
        for k in (kn, kl):
            print(
                f"{k.mode}: rdma_efficiency={k.rdma_efficiency:.4f} "
                f"dispatch_latency_us={k.dispatch_latency_s / US:.2f} "
                f"combine_latency_us={k.combine_latency_s / US:.2f}"
            )
    print("| mode | EP | phase | published | moesim | error | |")
    print("|---|---|---|---|---|---|---|")
    for r in report(kn, kl):
        print(
            f"| {r['mode']} | {r['ep']} | {r['phase']} | {r['published']:g} {r['unit']} | "
            f"{r['moesim']:.1f} {r['unit']} | {r['error']:+.1%} | "
            f"{'fit' if r['fit'] else 'held out'} |"
        )


if __name__ == "__main__":
    main()
