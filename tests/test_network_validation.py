"""The network model against measured NCCL all-to-alls between two H200s over NVLink.

Source: moesim/catalog/measurements/h200x2_collectives.jsonl (2x H200, NV18, NCCL 2.28,
slowest rank's median per call). The h200-sxm profile fits the all-to-all's alpha from the
same file, and the nvlink4 preset's achievable rate comes from its 1 GiB all-reduce, so
this is a consistency check of the flow model over the whole size range (4 KiB - 1 GiB),
not a held-out prediction.
"""

from __future__ import annotations

from importlib import resources

import pytest
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


@pytest.mark.parametrize(
    ("file", "large_bound", "small_bound"),
    [
        (
            "h200x2_collectives.jsonl",
            0.15,
            0.15,
        ),  # the team's file: the profile's alpha came from it
        # re-measured on another H200 pair by moesim.calibrate.torch_collectives (held out): its
        # fixed cost per call was 50-60 us instead of 70 us, so small messages are off by more
        ("h200x2_collectives_2026-11-22.jsonl", 0.10, 0.50),
    ],
)
def test_all_to_all_matches_measurements_large_and_small(
    file: str, large_bound: float, small_bound: float
) -> None:
    """Every size, 4 KiB to 1 GiB per rank, within the file's bounds: 15% throughout on the
    fitted file; on the held-out one 10% from 64 MiB up, 50% below, where the per-call
    fixed cost (which varies between machines) dominates."""
    path = resources.files("moesim.catalog") / "measurements" / file
    measured = of_kind(read(str(path)), "all_to_all")
    assert len(measured) >= 8
    for rec in measured:
        predicted = _simulated_a2a_s(rec["bytes_per_rank"])
        err = predicted / (rec["ms"] * 1e-3) - 1
        bound = large_bound if rec["bytes_per_rank"] >= 64 << 20 else small_bound
        assert abs(err) <= bound, (rec["bytes_per_rank"], rec["ms"], predicted * 1e3, err)


def test_four_gpu_all_to_all_through_nvswitch() -> None:
    """4 H200s of one HGX host (every pair NV18 through NVSwitch), NCCL all-to-all, 4 KiB to
    256 MiB per rank: within 15% at every size. Source:
    moesim/catalog/measurements/h200x4_collectives_2026-11-22.jsonl. The alpha (77 us) is
    fitted on this file; the bandwidth side (NVLink ports into the switch, the nvlink4
    preset's achievable rate from a 2-GPU all-reduce) is held out."""
    s = scenario_from_dict(
        {
            **PAIR,
            "cluster": {"preset": "dgx-h200", "accelerators_per_node": 4},
            "parallelism": {"dp": 4, "ep": 4},
        }
    )
    system = build_system(s)
    path = (
        resources.files("moesim.catalog") / "measurements" / "h200x4_collectives_2026-11-22.jsonl"
    )
    measured = of_kind(read(str(path)), "all_to_all")
    assert len(measured) >= 8 and all(r["world"] == 4 for r in measured)
    for rec in measured:
        share = rec["bytes_per_rank"] / 4
        env = simpy.Environment()
        net = FlowNetwork(env, system.paths)
        flows = [(i, j, share) for i in range(4) for j in range(4) if i != j]
        env.run(env.all_of(net.transfer_many(flows, system.layer_costs.a2a_overhead_s)))
        err = env.now / (rec["ms"] * 1e-3) - 1
        assert abs(err) <= 0.15, (rec["bytes_per_rank"], rec["ms"], env.now * 1e3, err)
