"""Paths between devices over the cluster graph, as arrays of directed-edge ids.

Device-to-device traffic never relays through a CPU host. Among the remaining routes the
one with the least serialization time per byte wins (sum of 1/bandwidth over the hops),
with latency as a tie-breaker, so NVLink is preferred over PCIe and a one-hop route over
a detour. Paths are computed per source on demand and cached.

Two path finders give routes of the same cost; where several routes tie (the many minimal
routes of a torus) they may pick different ones:

- up to :data:`NETWORKX_MAX_DEVICES` devices, networkx's Dijkstra (the reference, kept so
  small clusters route exactly as before), each source's routes to every device stored
  as one CSR table (offsets into a flat edge-id array, plus each route's latency);
- above, scipy's compiled Dijkstra (``scipy.sparse.csgraph``) for up to
  :data:`COMPILED_BATCH` sources per call, keeping only each source's predecessor tree;
  the routes of any set of (src, dst) pairs are then read off in one vectorized walk up
  the trees (:meth:`PathTable.edge_pairs`), one hop per numpy step for all pairs at once
  (a 2048-chip torus: 512 sources searched in ~0.1 s instead of ~13 s with networkx).

``tests/test_topology.py`` checks that both give routes of equal cost, hop count and
latency on every pair of small clusters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from moesim.topology.graph import Topology

NETWORKX_MAX_DEVICES = 128
"""Up to this many devices routes come from networkx; above, from scipy's csgraph."""
COMPILED_BATCH = 256
"""Sources routed per compiled Dijkstra call (bounds the predecessor matrix's memory)."""


@dataclass(frozen=True)
class SourceRoutes:
    """The routes from one source device to every device, as a CSR table."""

    offsets: np.ndarray
    """int64 (devices + 1): route to device d is ``edges[offsets[d]:offsets[d + 1]]``."""
    edges: np.ndarray
    """int64: directed-edge ids of all routes, each in order from the source."""
    latency_s: np.ndarray
    """float64 (devices,): one-way latency of each route (links plus switches passed)."""
    reachable: np.ndarray
    """bool (devices,): whether a route exists."""


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
        self._tables: dict[int, SourceRoutes] = {}
        self.compiled = len(topo.devices) > NETWORKX_MAX_DEVICES
        """Whether routes come from scipy's csgraph (large clusters) rather than networkx."""

    @cached_property
    def device_count(self) -> int:
        return len(self.topo.devices)

    def _weight(self, u: str, v: str, d: dict[str, float]) -> float:
        return 1.0 / d["bandwidth_gbps"] + 1e-6 * d["latency_us"]

    # ------------------------------------------------------------------ per-source tables

    def routes_from(self, src: int) -> SourceRoutes:
        """Every route from device ``src`` (computed once, then cached)."""
        table = self._tables.get(src)
        if table is None:
            table = self._compiled_routes(src) if self.compiled else self._networkx_routes(src)
            self._tables[src] = table
        return table

    def _networkx_routes(self, src: int) -> SourceRoutes:
        if src not in self._by_source:
            self._by_source[src] = nx.single_source_dijkstra_path(
                self._routes, self.topo.devices[src], weight=self._weight
            )
        found = self._by_source[src]
        n = self.device_count
        offsets = np.zeros(n + 1, dtype=np.int64)
        latency = np.zeros(n)
        reachable = np.zeros(n, dtype=bool)
        flat: list[int] = []
        for d, name in enumerate(self.topo.devices):
            hops = found.get(name)
            if hops is not None:
                reachable[d] = True
                flat.extend(self.edge_id[(a, b)] for a, b in itertools.pairwise(hops))
                links = sum(
                    self.latency_us[self.edge_id[(a, b)]] for a, b in itertools.pairwise(hops)
                )
                switches = sum(self.node_latency_us[h] for h in hops[1:-1])
                latency[d] = float(links + switches) * 1e-6
            offsets[d + 1] = len(flat)
        return SourceRoutes(offsets, np.array(flat, dtype=np.int64), latency, reachable)

    @cached_property
    def _compiled_graph(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
        """The routable graph as a weighted CSR matrix, plus lookups for the walk:
        each graph node's index, sorted (u * N + v) keys of the edges with their ids, and
        every node's switch latency (us)."""
        names = list(self._routes.nodes)
        index = {n: i for i, n in enumerate(names)}
        n = len(names)
        u, v, w, ids = [], [], [], []
        for (a, b), i in self.edge_id.items():
            if a in index and b in index:
                u.append(index[a])
                v.append(index[b])
                w.append(1.0 / self.bandwidth_gbps[i] + 1e-6 * self.latency_us[i])
                ids.append(i)
        matrix = sp.csr_matrix((np.array(w), (np.array(u), np.array(v))), shape=(n, n))
        keys = np.array(u, dtype=np.int64) * n + np.array(v, dtype=np.int64)
        order = np.argsort(keys)
        key_ids = np.stack([keys[order], np.array(ids, dtype=np.int64)[order]])
        node_lat = np.array([self.node_latency_us[x] for x in names])
        dev = np.array([index[d] for d in self.topo.devices], dtype=np.int64)
        return matrix, key_ids, node_lat, dev

    def prepare(self, sources: np.ndarray | list[int]) -> None:
        """Run the shortest-path search of many sources at once (one compiled Dijkstra call
        for all of them); a no-op for sources already searched or for small clusters."""
        if not self.compiled:
            return
        _, _, _, dev = self._compiled_graph
        want = np.unique(np.asarray(sources, dtype=np.int64))
        missing = want[~self._searched[want]]
        for i in range(0, len(missing), COMPILED_BATCH):
            chunk = missing[i : i + COMPILED_BATCH]
            matrix = self._compiled_graph[0]
            _, pred = csgraph.dijkstra(
                matrix, directed=True, indices=dev[chunk], return_predecessors=True
            )
            self._pred[chunk] = np.atleast_2d(pred)
            self._searched[chunk] = True

    @cached_property
    def _pred(self) -> np.ndarray:
        """Predecessor of every graph node on the shortest-path tree of each source device
        (rows filled by :meth:`prepare`)."""
        return np.full((self.device_count, self._compiled_graph[0].shape[0]), -9999, np.int32)

    @cached_property
    def _searched(self) -> np.ndarray:
        return np.zeros(self.device_count, dtype=bool)

    def _walk(
        self, src: np.ndarray, dst: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Routes of many pairs from the compiled search, walked back to their sources at
        once (one hop per iteration): ``(flow, edge, latency_s, reachable)`` with the hops of
        each flow in order from its source."""
        matrix, key_ids, node_lat, dev = self._compiled_graph
        self.prepare(src)
        n = matrix.shape[0]
        origin = dev[src]
        cur = dev[dst].copy()
        reachable = (self._pred[src, cur] >= 0) | (cur == origin)
        alive = reachable & (cur != origin)
        steps_at: list[np.ndarray] = []
        steps_edge: list[np.ndarray] = []
        latency = np.zeros(len(cur))
        while alive.any():
            which = np.flatnonzero(alive)
            here = cur[which]
            back = self._pred[src[which], here].astype(np.int64)
            edge = key_ids[1][np.searchsorted(key_ids[0], back * n + here)]
            steps_at.append(which)
            steps_edge.append(edge)
            inner = back != origin[which]
            latency[which] += self.latency_us[edge] + np.where(inner, node_lat[back], 0.0)
            cur[which] = back
            alive[which] = inner
        if not steps_at:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, latency * 1e-6, reachable
        at = np.concatenate(steps_at)
        step = np.concatenate([np.full(len(w), i) for i, w in enumerate(steps_at)])
        order = np.lexsort((-step, at))  # by flow, source end first
        return at[order], np.concatenate(steps_edge)[order], latency * 1e-6, reachable

    def _compiled_routes(self, src: int) -> SourceRoutes:
        """Every route from one source, from the compiled search."""
        n = self.device_count
        flow, edge, latency, reachable = self._walk(
            np.full(n, src, dtype=np.int64), np.arange(n, dtype=np.int64)
        )
        offsets = np.concatenate([[0], np.cumsum(np.bincount(flow, minlength=n))])
        return SourceRoutes(offsets.astype(np.int64), edge, latency, reachable)

    # ------------------------------------------------------------------ lookups

    def _check(self, table: SourceRoutes, src: int, dst: int) -> None:
        if not table.reachable[dst]:
            raise ValueError(f"no route from {self.topo.devices[src]} to {self.topo.devices[dst]}")

    def nodes(self, src: int, dst: int) -> list[str]:
        """The graph nodes on the route from device ``src`` to device ``dst``."""
        table = self.routes_from(src)
        self._check(table, src, dst)
        if not self.compiled:
            return self._by_source[src][self.topo.devices[dst]]
        ids = self.edge_ids(src, dst)
        return [self.topo.devices[src]] + [self.edges[i][1] for i in ids]

    def edge_ids(self, src: int, dst: int) -> np.ndarray:
        """Directed-edge ids along the route (empty for ``src == dst``)."""
        table = self.routes_from(src)
        self._check(table, src, dst)
        return table.edges[table.offsets[dst] : table.offsets[dst + 1]]

    def latency_s(self, src: int, dst: int) -> float:
        """One-way latency: the links' latencies plus the switches passed through."""
        table = self.routes_from(src)
        self._check(table, src, dst)
        return float(table.latency_s[dst])

    def _cached_pairs(
        self, src: np.ndarray, dst: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`edge_pairs` on a compiled table: pairs walked before are read from the
        pair cache (an all-to-all's pairs recur layer after layer); the others are walked
        once and added to it. The same routes as walking every pair."""
        n = self.device_count
        key = src * n + dst
        c = self._pair_cache
        pos = np.searchsorted(c.keys, key)
        pos_ok = np.minimum(pos, max(len(c.keys) - 1, 0))
        hit = (pos < len(c.keys)) & (c.keys[pos_ok] == key) if len(c.keys) else pos < 0
        if not hit.all():
            miss = np.unique(key[~hit])
            flow, edge, latency, reachable = self._walk(miss // n, miss % n)
            if not reachable.all():
                i = int(np.argmin(reachable))
                s, d = int(miss[i] // n), int(miss[i] % n)
                self._check(self.routes_from(s), s, d)
            c.add(miss, np.bincount(flow, minlength=len(miss)), edge, latency)
            pos = np.searchsorted(c.keys, key)
        slot = c.slot[pos]
        lengths = c.length[slot]
        edge = c.edges[ranges(c.start[slot], lengths)]
        return np.repeat(np.arange(len(key)), lengths), edge, c.latency_s[slot].copy()

    @cached_property
    def _pair_cache(self) -> _PairCache:
        return _PairCache()

    def edge_pairs(
        self, src: np.ndarray, dst: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The routes of many (src, dst) pairs at once, as incidence pairs.

        Returns ``(flow, edge, latency_s)``: flow index and directed-edge id of every hop
        (flows in order, each route's hops in order) and each pair's route latency.
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if self.compiled:
            return self._cached_pairs(src, dst)
        flows: list[np.ndarray] = []
        edges: list[np.ndarray] = []
        latency = np.zeros(len(src))
        for s in np.unique(src):
            which = np.flatnonzero(src == s)
            table = self.routes_from(int(s))
            d = dst[which]
            bad = ~table.reachable[d]
            if bad.any():
                self._check(table, int(s), int(d[np.argmax(bad)]))
            start, stop = table.offsets[d], table.offsets[d + 1]
            lengths = stop - start
            edges.append(table.edges[ranges(start, lengths)])
            flows.append(np.repeat(which, lengths))
            latency[which] = table.latency_s[d]
        if not flows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), latency
        flow = np.concatenate(flows)
        edge = np.concatenate(edges)
        order = np.argsort(flow, kind="stable")
        return flow[order], edge[order], latency


def ranges(start: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``start[i] .. start[i] + lengths[i] - 1`` of every ``i``, concatenated."""
    base = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return base + np.arange(int(lengths.sum()))


class _PairCache:
    """Routes of (src, dst) pairs already walked, by key ``src * devices + dst``: each
    pair's slot holds its hops (``edges[start:start + length]``) and its latency."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        """Cached keys, sorted."""
        self.slot = np.zeros(0, dtype=np.int64)
        """The slot of each sorted key."""
        self.start = np.zeros(0, dtype=np.int64)
        self.length = np.zeros(0, dtype=np.int64)
        self.latency_s = np.zeros(0)
        self.edges = np.zeros(0, dtype=np.int64)

    def add(
        self, keys: np.ndarray, lengths: np.ndarray, edges: np.ndarray, latency_s: np.ndarray
    ) -> None:
        """Add new pairs (``keys`` not yet cached) with their hops, in key order."""
        first = len(self.start)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + len(self.edges)
        self.start = np.concatenate([self.start, offsets])
        self.length = np.concatenate([self.length, lengths])
        self.latency_s = np.concatenate([self.latency_s, latency_s])
        self.edges = np.concatenate([self.edges, edges])
        all_keys = np.concatenate([self.keys, keys])
        all_slots = np.concatenate([self.slot, first + np.arange(len(keys))])
        order = np.argsort(all_keys, kind="stable")
        self.keys, self.slot = all_keys[order], all_slots[order]
