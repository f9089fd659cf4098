"""Paths between devices over the cluster graph, as arrays of directed-edge ids.

Device-to-device traffic never relays through a CPU host. Among the remaining routes the
one with the least serialization time per byte wins (sum of 1/bandwidth over the hops),
with latency as a tie-breaker, so NVLink is preferred over PCIe and a one-hop route over
a detour. Paths are computed per source on demand and cached.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import networkx as nx
import numpy as np

from moesim.topology.graph import Topology


class PathTable:
    """Edge-id paths and latencies between the devices of a topology."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        g = topo.graph
        self.edges: list[tuple[str, str]] = list(g.edges)
        self.edge_id = {e: i for i, e in enumerate(self.edges)}
        self.bandwidth_gbps = np.array([g.edges[e]["bandwidth_gbps"] for e in self.edges])
        self.latency_us = np.array([g.edges[e]["latency_us"] for e in self.edges])
        self.node_latency_us = {n: float(d.get("latency_us", 0.0)) for n, d in g.nodes(data=True)}
        self._routes = g.subgraph([n for n, d in g.nodes(data=True) if d["kind"] != "host"])
        self._by_source: dict[int, dict[str, list[str]]] = {}

    @cached_property
    def device_count(self) -> int:
        return len(self.topo.devices)

    def _weight(self, u: str, v: str, d: dict[str, float]) -> float:
        return 1.0 / d["bandwidth_gbps"] + 1e-6 * d["latency_us"]

    def nodes(self, src: int, dst: int) -> list[str]:
        """The graph nodes on the route from device ``src`` to device ``dst``."""
        if src not in self._by_source:
            self._by_source[src] = nx.single_source_dijkstra_path(
                self._routes, self.topo.devices[src], weight=self._weight
            )
        try:
            return self._by_source[src][self.topo.devices[dst]]
        except KeyError:
            raise ValueError(
                f"no route from {self.topo.devices[src]} to {self.topo.devices[dst]}"
            ) from None

    def edge_ids(self, src: int, dst: int) -> np.ndarray:
        """Directed-edge ids along the route (empty for ``src == dst``)."""
        hops = self.nodes(src, dst)
        return np.array([self.edge_id[(a, b)] for a, b in itertools.pairwise(hops)], dtype=np.int64)

    def latency_s(self, src: int, dst: int) -> float:
        """One-way latency: the links' latencies plus the switches passed through."""
        hops = self.nodes(src, dst)
        links = sum(self.latency_us[self.edge_id[(a, b)]] for a, b in itertools.pairwise(hops))
        switches = sum(self.node_latency_us[n] for n in hops[1:-1])
        return float(links + switches) * 1e-6
