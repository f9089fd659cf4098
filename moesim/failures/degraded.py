"""A failure state's degraded system: a new :class:`~moesim.system.System`, never a
mutated one.

Degraded links get their bandwidth scaled; down links are removed, so paths are
recomputed and traffic takes another route when there is one (:func:`unreachable` finds
the devices left without a route, which the plan treats as dead). The layout
(:class:`FailedLayout`) gives no tokens to data-parallel ranks with a dead device and
carries the standby replica experts as extra columns owned by the next EP rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from moesim.derived.replica_memory import replica_experts, replica_owner
from moesim.failures.state import FailureState
from moesim.layout import Layout
from moesim.system import System
from moesim.topology.graph import Topology
from moesim.topology.paths import PathTable


def link_edges(topo: Topology, device: int, which: str) -> list[tuple[str, str]]:
    """The directed edges of a device's scale-up ports, its NIC's fabric port, or all."""
    g = topo.graph
    me = topo.devices[device]
    kind = nx.get_node_attributes(g, "kind")
    out: list[tuple[str, str]] = []
    nics = [v for v in g.successors(me) if kind[v] == "nic"]
    for v in g.successors(me):
        scale_up = kind[v] == "device" or (kind[v] == "switch" and v.endswith(".nvswitch"))
        if which == "all" or (which == "scale_up" and scale_up):
            out += [(me, v), (v, me)]
    if which in ("nic", "all"):
        for nic in nics:
            for v in g.successors(nic):
                if kind[v] == "switch":
                    out += [(nic, v), (v, nic)]
    return out


def degraded_topology(topo: Topology, state: FailureState) -> Topology:
    """A copy of the topology with the state's links scaled or removed (a dead device's
    links are left alone: it carries no traffic, and its peers keep a route to it)."""
    if not state.links:
        return topo
    g = topo.graph.copy()
    for device, which, frac in state.links:
        if device in state.dead:
            continue
        for u, v in link_edges(topo, device, which):
            if not g.has_edge(u, v):
                continue
            if frac == 0.0:
                g.remove_edge(u, v)
            else:
                g[u][v]["bandwidth_gbps"] = g[u][v]["bandwidth_gbps"] * frac
    return replace(topo, graph=g)


def unreachable(topo: Topology, state: FailureState) -> frozenset[int]:
    """Live devices cut off from the largest group of live devices by downed links."""
    if not any(f == 0.0 for _, _, f in state.links):
        return frozenset()
    g = degraded_topology(topo, state).graph
    kind = nx.get_node_attributes(g, "kind")
    und = g.subgraph([n for n in g if kind[n] != "host"]).to_undirected()
    live = [d for d in range(len(topo.devices)) if d not in state.dead]
    comp = {n: i for i, c in enumerate(nx.connected_components(und)) for n in c}
    sizes: dict[int, int] = {}
    for d in live:
        sizes[comp[topo.devices[d]]] = sizes.get(comp[topo.devices[d]], 0) + 1
    if not sizes:
        return frozenset()
    main = max(sizes, key=lambda c: (sizes[c], -c))
    return frozenset(d for d in live if comp[topo.devices[d]] != main)


@dataclass(frozen=True)
class FailedLayout(Layout):
    """A layout with dead data-parallel ranks (no tokens) and replica experts appended as
    columns ``experts_real ..`` owned by the next EP rank of their expert."""

    dead_dp: frozenset[int] = frozenset()
    experts_real: int = 0
    replica_of: tuple[int, ...] = ()
    """The original expert of each replica column."""

    def tokens_per_rank(self, tokens: int) -> np.ndarray:
        alive = [d for d in range(self.dp) if d not in self.dead_dp]
        out = np.zeros(self.stage_ranks, dtype=np.int64)
        if not alive:
            return out
        per = [len(a) for a in np.array_split(np.arange(tokens), len(alive))]
        for d, n in zip(alive, per):
            out[d * self.tp : (d + 1) * self.tp] = [
                len(a) for a in np.array_split(np.arange(n), self.tp)
            ]
        return out


def failed_layout(system: System, dead: frozenset[int]) -> FailedLayout:
    lay = system.layout
    reps = replica_experts(system.scenario)
    owner = np.concatenate([lay.owner, replica_owner(lay.owner, reps, lay.ep)])
    dead_dp = frozenset((d % lay.stage_ranks) // lay.tp for d in dead)
    return FailedLayout(
        lay.dp,
        lay.tp,
        lay.pp,
        lay.ep,
        lay.etp,
        lay.experts + len(reps),
        owner,
        dead_dp,
        lay.experts,
        tuple(reps),
    )


def degraded_system(system: System, state: FailureState) -> System:
    """The system in a failure state (the healthy system itself when nothing is broken)."""
    if state.healthy and not replica_experts(system.scenario):
        return system
    topo = degraded_topology(system.topology, state)
    paths = system.paths if topo is system.topology else PathTable(topo)
    costs = replace(system.layer_costs, topology=topo)
    return replace(
        system,
        topology=topo,
        paths=paths,
        layout=failed_layout(system, state.dead),
        layer_costs=costs,
    )


def lost_ep_ranks(layout: Layout, dead: frozenset[int]) -> dict[int, set[int]]:
    """For each expert-data-parallel group, the EP ranks with a dead device."""
    out: dict[int, set[int]] = {}
    for d in dead:
        local = d % layout.stage_ranks
        out.setdefault(layout.edp_group(local), set()).add((local // layout.etp) % layout.ep)
    return out
