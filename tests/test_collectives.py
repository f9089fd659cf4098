"""Collective costs: closed forms on one link, topology effects, and measured H200 pairs."""

from __future__ import annotations

from importlib import resources

import pytest

from moesim.calibrate.records import of_kind, read
from moesim.catalog.hardware import link, switch
from moesim.cost.collectives import all_gather_s, all_reduce_s, reduce_scatter_s
from moesim.loader import scenario_from_dict
from moesim.system import build_system
from moesim.topology.graph import rate


def _paths(cluster: object, devices: int):
    data = {
        "name": "c",
        "cluster": cluster,
        "model": "mixtral-8x7b",
        "parallelism": {"dp": devices, "ep": 1},
        "workload": {"kind": "layer", "tokens": 1},
    }
    return build_system(scenario_from_dict(data)).paths


def test_ring_all_reduce_on_two_gpus_is_bytes_over_bandwidth() -> None:
    """p=2 ring: 2(p-1) steps of n/p bytes = n / bw, plus two latencies."""
    paths = _paths("h200x2", 2)
    nv = link("nvlink4")
    n = 1 << 30
    expected = n / (18 * rate(nv) * 1e9) + 2 * nv.latency_us * 1e-6
    assert all_reduce_s(paths, [0, 1], n) == pytest.approx(expected, rel=1e-9)


def test_ring_all_reduce_matches_measured_h200_pair() -> None:
    """The 1 GiB all-reduce measured on 2x H200 (NCCL) is predicted within 5%."""
    path = resources.files("moesim.catalog") / "measurements" / "h200x2_collectives.jsonl"
    (big,) = [r for r in of_kind(read(str(path)), "all_reduce") if r["bytes"] == 1 << 30]
    predicted = all_reduce_s(_paths("h200x2", 2), [0, 1], big["bytes"])
    assert predicted == pytest.approx(big["ms"] * 1e-3, rel=0.05)


def test_eight_gpus_on_nvswitch_ring_closed_form() -> None:
    """On a non-blocking NVSwitch each ring step runs at one GPU's link rate."""
    paths = _paths("dgx-h100", 8)
    nv = link("nvlink4")
    sw = switch("nvswitch-gen3")
    n = 8 << 26
    step = n / 8 / (18 * rate(nv) * 1e9) + 2 * nv.latency_us * 1e-6 + sw.latency_us * 1e-6
    assert all_reduce_s(paths, list(range(8)), n) == pytest.approx(14 * step, rel=1e-9)
    assert reduce_scatter_s(paths, list(range(8)), n) == pytest.approx(7 * step, rel=1e-9)
    assert all_gather_s(paths, list(range(8)), n) == pytest.approx(7 * step, rel=1e-9)


def test_cross_node_ring_is_slower_and_algorithms_differ() -> None:
    """A ring across nodes is paced by the NICs; small messages favour log-step algorithms."""
    paths = _paths({"preset": "h100-fat-tree", "nodes": 2}, 16)
    intra = all_reduce_s(paths, list(range(8)), 1 << 28)
    cross = all_reduce_s(paths, [0, 8, 1, 9, 2, 10, 3, 11], 1 << 28)
    assert cross > 2 * intra
    group = list(range(16))
    small = 4096
    assert all_reduce_s(paths, group, small, "halving_doubling", 5e-6) < all_reduce_s(
        paths, group, small, "ring", 5e-6
    )
    with pytest.raises(ValueError, match="power-of-two"):
        all_reduce_s(paths, list(range(6)), small, "tree")


def test_doubling_bandwidth_never_slows() -> None:
    """Twice the bytes never take less time; a single rank costs nothing."""
    paths = _paths("dgx-h100", 8)
    for algo in ("ring", "halving_doubling", "tree"):
        a = all_reduce_s(paths, list(range(8)), 1 << 20, algo)
        b = all_reduce_s(paths, list(range(8)), 1 << 21, algo)
        assert b >= a > 0
    assert all_reduce_s(paths, [3], 1 << 20) == 0.0
