"""The network model against measured NCCL all-to-alls between two H200s over NVLink.

Source: moesim/catalog/measurements/h200x2_collectives.jsonl (2x H200, NV18, NCCL 2.28,
slowest rank's median per call). The h200-sxm profile fits the all-to-all's alpha from the
same file, and the nvlink4 preset's achievable rate comes from its 1 GiB all-reduce, so
this is a consistency check of the flow model over the whole size range (4 KiB - 1 GiB),
not a held-out prediction.
"""

from __future__ import annotations

from importlib import resources

import simpy

from moesim.calibrate.records import of_kind, read
from moesim.engine.network import FlowNetwork
from moesim.loader import scenario_from_dict
from moesim.system import build_system

PAIR = {
    "name": "pair",
    "cluster": "h200x2",
    "model": "mixtral-8x7b",
    "parallelism": {"dp": 2, "ep": 2},
    "workload": {"kind": "layer", "tokens": 2},
}


def _simulated_a2a_s(bytes_per_rank: int) -> float:
    system = build_system(scenario_from_dict(PAIR))
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    half = bytes_per_rank / 2  # each rank keeps half its buffer and sends half to the peer
    events = net.transfer_many([(0, 1, half), (1, 0, half)], system.layer_costs.a2a_overhead_s)
    env.run(env.all_of(events))
    return float(env.now)


def test_all_to_all_matches_measurements_large_and_small() -> None:
    """Every measured size, 4 KiB to 1 GiB per rank, is predicted within 15%."""
    path = resources.files("moesim.catalog") / "measurements" / "h200x2_collectives.jsonl"
    measured = of_kind(read(str(path)), "all_to_all")
    assert len(measured) >= 8
    for rec in measured:
        predicted = _simulated_a2a_s(rec["bytes_per_rank"])
        err = predicted / (rec["ms"] * 1e-3) - 1
        assert abs(err) <= 0.15, (rec["bytes_per_rank"], rec["ms"], predicted * 1e3, err)
