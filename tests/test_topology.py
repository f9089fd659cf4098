"""Cluster graphs and device-to-device routes (moesim.topology.graph, moesim.topology.paths)."""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from moesim.catalog.hardware import link, switch
from moesim.config.cluster import ClusterConfig, NodesCluster, TorusCluster
from moesim.loader.presets import expand_presets
from moesim.topology import paths as paths_module
from moesim.topology.graph import Topology, build, rate
from moesim.topology.paths import PathTable


def _cluster(value: Any) -> NodesCluster | TorusCluster:
    data: dict[str, Any] = {"cluster": value}
    expand_presets(data, {})
    return TypeAdapter(ClusterConfig).validate_python(data["cluster"])


@cache
def _built(key: str, nodes: int | None = None) -> tuple[Any, Topology, PathTable]:
    value: Any = key if nodes is None else {"preset": key, "nodes": nodes}
    c = _cluster(value)
    topo = build(c)
    return c, topo, PathTable(topo)


def _kinds(topo: Topology, hops: list[str]) -> list[str]:
    return [topo.graph.nodes[n]["kind"] for n in hops]


def _bandwidths(topo: Topology, hops: list[str]) -> list[float]:
    return [topo.graph.edges[a, b]["bandwidth_gbps"] for a, b in itertools.pairwise(hops)]


def _torus_hops(a: tuple[int, ...], b: tuple[int, ...], dims: tuple[int, ...], wrap: bool) -> int:
    total = 0
    for x, y, n in zip(a, b, dims):
        d = abs(x - y)
        total += min(d, n - d) if wrap else d
    return total


# --------------------------------------------------------------------- single nodes


def test_dgx_gpu_to_gpu_through_nvswitch() -> None:
    """In a DGX H100 every GPU pair routes GPU -> NVSwitch -> GPU at 18 x NVLink4 per direction."""
    c, topo, pt = _built("dgx-h100")
    (port,) = c.accelerator.ports
    nv = link(port.link)
    assert port.link == "nvlink4" and port.count == 18
    for s, d in itertools.permutations(range(8), 2):
        hops = pt.nodes(s, d)
        assert hops == [topo.devices[s], "n0.nvswitch", topo.devices[d]]
        assert _bandwidths(topo, hops) == pytest.approx([18 * rate(nv)] * 2)
        assert len(pt.edge_ids(s, d)) == 2


def test_dgx_latency_sums_links_and_switch() -> None:
    """GPU -> GPU latency in a DGX is two NVLink hops plus the NVSwitch's latency."""
    _, _, pt = _built("dgx-h100")
    expected_us = 2 * link("nvlink4").latency_us + switch("nvswitch-gen3").latency_us
    assert pt.latency_s(0, 5) == pytest.approx(expected_us * 1e-6)


def test_same_device_route_is_empty() -> None:
    """A device's route to itself has no edges and no latency."""
    _, _, pt = _built("dgx-h100")
    assert len(pt.edge_ids(3, 3)) == 0
    assert pt.latency_s(3, 3) == 0.0


def test_h200x2_direct_nvlink() -> None:
    """The H200 pair talks over one direct hop of 18 NVLink4 links (not via PCIe or host)."""
    c, topo, pt = _built("h200x2")
    (port,) = c.accelerator.ports
    nv = link(port.link)
    for s, d in ((0, 1), (1, 0)):
        hops = pt.nodes(s, d)
        assert hops == [topo.devices[s], topo.devices[d]]
        assert _bandwidths(topo, hops) == pytest.approx([port.count * rate(nv)])
    assert pt.latency_s(0, 1) == pytest.approx(nv.latency_us * 1e-6)


# --------------------------------------------------------------------- fabrics


def test_fat_tree_4_nodes_single_leaf() -> None:
    """4 DGX nodes fit one leaf: cross-node routes are GPU -> NIC -> leaf -> NIC -> GPU."""
    c, topo, pt = _built("h100-fat-tree", 4)
    assert "spine" not in topo.graph
    nic = link(c.fabric.nic)
    for s, d in ((0, 8), (0, 11), (5, 31), (31, 0)):
        hops = pt.nodes(s, d)
        assert _kinds(topo, hops) == ["device", "nic", "switch", "nic", "device"]
        assert hops[2].startswith("leaf")
        assert min(_bandwidths(topo, hops)) == pytest.approx(rate(nic))
        # GPU -> NIC over PCIe (GPUDirect), one NIC cable each side of the leaf, the leaf
        pcie = link(c.accelerator.host_link)
        expected_us = 2 * pcie.latency_us + 2 * nic.latency_us + switch(c.fabric.switch).latency_us
        assert pt.latency_s(s, d) == pytest.approx(expected_us * 1e-6)


def test_fat_tree_16_nodes_crosses_spine() -> None:
    """With 16 nodes there are several leaves; routes between leaves pass the spine."""
    c, topo, pt = _built("h100-fat-tree", 16)
    leaves = [n for n in topo.graph if n.startswith("leaf")]
    assert len(leaves) > 1 and "spine" in topo.graph
    # node 0 and node 15 hang off different leaves
    hops = pt.nodes(0, 127)
    assert _kinds(topo, hops) == ["device", "nic", "switch", "switch", "switch", "nic", "device"]
    assert hops[3] == "spine"
    assert hops[2] != hops[4]
    nic, sw = link(c.fabric.nic), switch(c.fabric.switch)
    pcie = link(c.accelerator.host_link)
    expected_us = 2 * pcie.latency_us + 4 * nic.latency_us + 3 * sw.latency_us
    assert pt.latency_s(0, 127) == pytest.approx(expected_us * 1e-6)
    # a non-blocking fabric: the spine uplinks never narrow the NIC bandwidth
    assert min(_bandwidths(topo, hops)) == pytest.approx(rate(nic))
    # nodes 0 and 1 share a leaf: no spine
    assert "spine" not in pt.nodes(0, 8)


def test_rail_same_rail_and_cross_rail() -> None:
    """Rail-optimized: GPU i to GPU i of another node uses rail i only; other pairs use NICs."""
    _, topo, pt = _built("h100-rail")
    assert "spine" in topo.graph  # 8 rails are joined by a spine
    for i in range(8):
        hops = pt.nodes(i, 8 + i)
        assert hops == [f"n0.gpu{i}", f"n0.nic{i}", f"rail{i}", f"n1.nic{i}", f"n1.gpu{i}"]
    for s, d in ((0, 11), (2, 31)):
        hops = pt.nodes(s, d)
        kinds = _kinds(topo, hops)
        assert kinds.count("nic") == 2
        nics = [h for h, k in zip(hops, kinds) if k == "nic"]
        assert nics[0].split(".")[0] != nics[1].split(".")[0]  # leaves one node, enters another


@pytest.mark.parametrize(
    ("key", "nodes"),
    [
        ("dgx-h100", None),
        ("h200x2", None),
        ("h100-fat-tree", 4),
        ("h100-fat-tree", 16),
        ("h100-rail", None),
        ("tpu-v3-32", None),
        ("tpu-v4-1024", None),
    ],
)
def test_routes_are_connected_and_avoid_hosts(key: str, nodes: int | None) -> None:
    """Every device route starts and ends at the right devices, follows edges, skips hosts."""
    _, topo, pt = _built(key, nodes)
    assert topo.hosts  # hosts exist in the graph, they just must not relay traffic
    n = len(topo.devices)
    sources = range(n) if n <= 32 else (0, n // 3, n - 1)
    for s in sources:
        for d in range(n):
            hops = pt.nodes(s, d)
            assert hops[0] == topo.devices[s] and hops[-1] == topo.devices[d]
            assert "host" not in _kinds(topo, hops)
            ids = pt.edge_ids(s, d)
            assert [pt.edges[i] for i in ids] == list(itertools.pairwise(hops))


@pytest.mark.parametrize("key", ["dgx-h100", "h100-rail", "tpu-v3-32"])
def test_every_connection_is_full_duplex(key: str) -> None:
    """Each directed edge has a reverse edge with the same bandwidth and latency."""
    _, topo, _ = _built(key)
    g = topo.graph
    for u, v, data in g.edges(data=True):
        assert g.has_edge(v, u)
        assert g.edges[v, u]["bandwidth_gbps"] == data["bandwidth_gbps"]
        assert g.edges[v, u]["latency_us"] == data["latency_us"]


# --------------------------------------------------------------------- tori


def test_torus_v4_neighbours_and_diameter() -> None:
    """On the 8x8x8 wraparound torus neighbours are one hop and the farthest chip is 12 hops."""
    c, topo, pt = _built("tpu-v4-1024")
    assert c.dims == (8, 8, 8) and c.wraparound
    ici = link(c.link)
    index = {topo.graph.nodes[d]["coords"]: i for i, d in enumerate(topo.devices)}
    origin = index[(0, 0, 0)]
    for nb in [(1, 0, 0), (7, 0, 0), (0, 1, 0), (0, 7, 0), (0, 0, 1), (0, 0, 7)]:
        assert len(pt.edge_ids(origin, index[nb])) == 1
    assert len(pt.edge_ids(origin, index[(4, 4, 4)])) == 12
    assert pt.latency_s(origin, index[(4, 4, 4)]) == pytest.approx(12 * ici.latency_us * 1e-6)
    for src in (origin, index[(3, 6, 1)]):
        a = topo.graph.nodes[topo.devices[src]]["coords"]
        hops = {d: len(pt.edge_ids(src, i)) for d, i in index.items()}
        expected = {d: _torus_hops(a, d, c.dims, True) for d in index}
        assert hops == expected
        assert max(hops.values()) == 12


def test_mesh_v3_32_no_wraparound() -> None:
    """The 4x4 slice without wraparound has Manhattan distances, at most 6 hops."""
    c, topo, pt = _built("tpu-v3-32")
    assert c.dims == (4, 4) and not c.wraparound
    coords = [topo.graph.nodes[d]["coords"] for d in topo.devices]
    worst = 0
    for s, d in itertools.product(range(16), repeat=2):
        h = len(pt.edge_ids(s, d))
        assert h == _torus_hops(coords[s], coords[d], c.dims, False)
        worst = max(worst, h)
    assert worst == 6
    # corner to corner of the same row is 3 hops: no wrap link shortcut
    assert len(pt.edge_ids(coords.index((0, 0)), coords.index((0, 3)))) == 3
    ici = link(c.link)
    assert pt.latency_s(0, 15) == pytest.approx(6 * ici.latency_us * 1e-6)


def test_torus_link_bandwidth() -> None:
    """Each torus neighbour link carries links_per_neighbor x the ICI link bandwidth."""
    c, topo, pt = _built("tpu-v4-1024")
    ici = link(c.link)
    hops = pt.nodes(0, 1)
    assert _bandwidths(topo, hops) == pytest.approx([c.links_per_neighbor * rate(ici)])


def test_unreachable_device_raises() -> None:
    """A route between disconnected devices is a ValueError, not a silent empty path."""
    c = _cluster({"preset": "h100-fat-tree", "nodes": 2, "fabric": {"kind": "none"}})
    pt = PathTable(build(c))
    with pytest.raises(ValueError, match="no route"):
        pt.nodes(0, 8)


# --------------------------------------------------------------------- compiled routes


def _route_cost(pt: PathTable, ids: np.ndarray) -> float:
    return float(np.sum(1.0 / pt.bandwidth_gbps[ids] + 1e-6 * pt.latency_us[ids]))


@pytest.mark.parametrize(
    ("key", "nodes"),
    [("dgx-h100", None), ("h100-fat-tree", 16), ("h100-rail", None), ("tpu-v3-32", None)],
)
def test_compiled_routes_match_networkx(
    key: str, nodes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scipy's compiled Dijkstra (used above NETWORKX_MAX_DEVICES devices) finds routes of
    the same cost, hop count and latency as networkx for device pairs, valid edge by
    edge, and the batched lookup returns the same routes as the one-pair lookup."""
    _, topo, reference = _built(key, nodes)
    monkeypatch.setattr(paths_module, "NETWORKX_MAX_DEVICES", 0)
    pt = PathTable(topo)
    assert pt.compiled and not reference.compiled
    n = len(topo.devices)
    sources = range(n) if n <= 32 else (0, 1, n // 3, n - 1)
    pairs = [(s, d) for s in sources for d in range(n)]
    for s, d in pairs:
        ids, ref = pt.edge_ids(s, d), reference.edge_ids(s, d)
        assert len(ids) == len(ref)
        assert _route_cost(pt, ids) == pytest.approx(_route_cost(reference, ref), rel=1e-12)
        assert pt.latency_s(s, d) == pytest.approx(reference.latency_s(s, d), rel=1e-12)
        hops = pt.nodes(s, d)
        assert hops[0] == topo.devices[s] and hops[-1] == topo.devices[d]
        assert [pt.edges[i] for i in ids] == list(itertools.pairwise(hops))
        assert "host" not in _kinds(topo, hops)
    src = np.array([s for s, _ in pairs])
    dst = np.array([d for _, d in pairs])
    flow, edge, latency = pt.edge_pairs(src, dst)
    for i, (s, d) in enumerate(pairs):
        np.testing.assert_array_equal(edge[flow == i], pt.edge_ids(s, d))
        assert latency[i] == pytest.approx(pt.latency_s(s, d))
    # the networkx tables answer the batched lookup the same way
    flow_r, edge_r, latency_r = reference.edge_pairs(src, dst)
    for i, (s, d) in enumerate(pairs):
        np.testing.assert_array_equal(edge_r[flow_r == i], reference.edge_ids(s, d))
    np.testing.assert_allclose(latency_r, latency)


def test_compiled_unreachable_device_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled path finder also refuses a route between disconnected devices."""
    monkeypatch.setattr(paths_module, "NETWORKX_MAX_DEVICES", 0)
    c = _cluster({"preset": "h100-fat-tree", "nodes": 2, "fabric": {"kind": "none"}})
    pt = PathTable(build(c))
    assert pt.compiled
    with pytest.raises(ValueError, match="no route"):
        pt.edge_ids(0, 8)
    with pytest.raises(ValueError, match="no route"):
        pt.edge_pairs(np.array([0, 1]), np.array([1, 9]))


def test_2048_chip_torus_routes_are_minimal() -> None:
    """On an 8x16x16 torus (2048 chips, compiled routes) every route from two sources has
    the torus distance in hops, and the batched routes of all pairs from a 64-chip group
    agree with the torus distance too."""
    c = _cluster({"preset": "tpu-v4-1024", "dims": [8, 16, 16]})
    topo = build(c)
    pt = PathTable(topo)
    assert pt.compiled and len(topo.devices) == 2048
    coords = [topo.graph.nodes[d]["coords"] for d in topo.devices]
    for s in (0, 1234):
        for d in range(0, 2048, 7):
            assert len(pt.edge_ids(s, d)) == _torus_hops(coords[s], coords[d], c.dims, True)
    group = np.arange(64)
    src, dst = np.repeat(group, 64), np.tile(group, 64)
    flow, _, _ = pt.edge_pairs(src, dst)
    hops = np.bincount(flow, minlength=len(src))
    expected = [_torus_hops(coords[s], coords[d], c.dims, True) for s, d in zip(src, dst)]
    np.testing.assert_array_equal(hops, expected)
