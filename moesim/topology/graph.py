"""The cluster as a directed networkx graph of devices, switches, NICs and hosts.

It is built from the cluster configuration alone: the specs of the links and switches
the cluster names are its ``links`` and ``switches`` (filled from the catalog by the
loader, and overridable), so a resolved scenario rebuilds the same graph.

Every physical connection becomes two directed edges (one per direction) carrying the
link's per-direction bandwidth (GB/s), ``latency_us`` and the link's name (``link``). The
bandwidth is the link's measured achievable rate (``effective_bandwidth_gbps``) where the
spec has one, else its datasheet rate: a prediction should use what the hardware
delivers. Switch tiers whose members are interchangeable for traffic (the NVSwitch chips
of a node, the spine switches of a fabric, reached by ECMP) are folded into one logical
switch whose edges carry the sum of the member links' bandwidth: the usual "big switch"
abstraction, exact for non-blocking tiers and for perfectly balanced ECMP.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import networkx as nx

from moesim.config.cluster import ClusterConfig, HostSpec, NodesCluster, TorusCluster
from moesim.config.hardware import LinkSpec


@dataclass(frozen=True)
class Topology:
    """A built cluster: the graph plus the device nodes in rank order."""

    graph: nx.DiGraph
    devices: tuple[str, ...]
    """Graph node of each device, indexed by global device id."""
    hosts: tuple[str, ...]
    """Graph node of each host."""
    host_of: tuple[int, ...]
    """Host index of each device."""
    host_spec: HostSpec
    node_of: tuple[int, ...] = ()
    """Scale-up domain (server) of each device; one domain for a torus."""
    local_of: tuple[int, ...] = ()
    """Index of each device inside its domain."""

    @property
    def device_at(self) -> dict[tuple[int, int], int]:
        """Device id by (domain, local index)."""
        return {(n, i): d for d, (n, i) in enumerate(zip(self.node_of, self.local_of))}


def build(cluster: ClusterConfig) -> Topology:
    """Build the graph of a cluster configuration."""
    if isinstance(cluster, TorusCluster):
        return _torus(cluster)
    return _nodes(cluster)


def rate(link: LinkSpec) -> float:
    """GB/s per direction a link delivers: measured where known, else its datasheet rate."""
    return link.effective_bandwidth_gbps or link.bandwidth_gbps


def _connect(
    g: nx.DiGraph, a: str, b: str, bandwidth_gbps: float, latency_us: float, link: str
) -> None:
    """Add both directions of a full-duplex connection (bandwidth per direction)."""
    for u, v in ((a, b), (b, a)):
        if g.has_edge(u, v):  # parallel links between the same two nodes add up
            g[u][v]["bandwidth_gbps"] += bandwidth_gbps
        else:
            g.add_edge(u, v, bandwidth_gbps=bandwidth_gbps, latency_us=latency_us, link=link)


def _nodes(c: NodesCluster) -> Topology:
    g = nx.DiGraph()
    acc = c.accelerator
    per = c.accelerators_per_node
    host_link = c.link_spec(acc.host_link) if acc.host_link else None
    devices: list[str] = []
    hosts: list[str] = []
    host_of: list[int] = []
    for n in range(c.nodes):
        host = f"n{n}.host"
        g.add_node(host, kind="host", node=n)
        hosts.append(host)
        gpus = [f"n{n}.gpu{i}" for i in range(per)]
        for i, gpu in enumerate(gpus):
            g.add_node(gpu, kind="device", node=n, index=n * per + i)
            devices.append(gpu)
            host_of.append(n)
        _scale_up(g, c, n, gpus)
        if host_link is not None:
            pcie = f"n{n}.pcie"
            g.add_node(pcie, kind="switch", node=n, latency_us=0.0)
            for gpu in gpus:
                _connect(g, gpu, pcie, rate(host_link), host_link.latency_us, host_link.name)
            _connect(g, pcie, host, rate(host_link) * per, host_link.latency_us, host_link.name)
    if c.fabric.kind != "none":
        _fabric(g, c, devices)
    count = len(devices)
    return Topology(
        g,
        tuple(devices),
        tuple(hosts),
        tuple(host_of),
        c.host,
        tuple(d // per for d in range(count)),
        tuple(d % per for d in range(count)),
    )


def _scale_up(g: nx.DiGraph, c: NodesCluster, n: int, gpus: list[str]) -> None:
    acc = c.accelerator
    if c.scale_up.kind == "nvswitch" and c.scale_up.switch:
        sw = c.switch_spec(c.scale_up.switch)
        node = f"n{n}.nvswitch"
        g.add_node(node, kind="switch", node=n, latency_us=sw.latency_us)
        for gpu in gpus:
            for port in acc.ports:
                ln = c.link_spec(port.link)
                _connect(g, gpu, node, port.count * rate(ln), ln.latency_us, ln.name)
    elif c.scale_up.kind == "mesh" and len(gpus) > 1:
        peers = len(gpus) - 1
        for a, b in itertools.combinations(gpus, 2):
            for port in acc.ports:
                ln = c.link_spec(port.link)
                links = port.count / peers
                _connect(g, a, b, links * rate(ln), ln.latency_us, ln.name)
    # 'pcie': GPUs reach each other through the node's PCIe switch, added with the host link


def _fabric(g: nx.DiGraph, c: NodesCluster, devices: list[str]) -> None:
    fab = c.fabric
    if fab.nic is None or fab.switch is None:  # the config rules reject this first
        raise ValueError("a fabric needs a NIC link and a switch preset")
    nic = c.link_spec(fab.nic)
    sw = c.switch_spec(fab.switch)
    per = c.accelerators_per_node
    down = max(1, math.floor(sw.ports * fab.oversubscription / (1 + fab.oversubscription)))
    up = sw.ports - down
    # NIC j of node n: fat-tree fills leaves node by node; rail-optimized puts NIC j on rail j
    leaf_of: dict[tuple[int, int], str] = {}
    if fab.kind == "rail_optimized":
        groups = math.ceil(c.nodes / down)
        for n in range(c.nodes):
            for j in range(fab.nics_per_node):
                leaf_of[(n, j)] = f"rail{j}.leaf{n // down}" if groups > 1 else f"rail{j}"
    else:
        for n in range(c.nodes):
            for j in range(fab.nics_per_node):
                leaf_of[(n, j)] = f"leaf{(n * fab.nics_per_node + j) // down}"
    leaves = sorted(set(leaf_of.values()))
    for leaf in leaves:
        g.add_node(leaf, kind="switch", latency_us=sw.latency_us)
    for n in range(c.nodes):
        for j in range(fab.nics_per_node):
            name = f"n{n}.nic{j}"
            g.add_node(name, kind="nic", node=n)
            _connect(g, name, leaf_of[(n, j)], rate(nic), nic.latency_us, nic.name)
        for i in range(per):
            # GPUDirect RDMA: the GPU reaches its NIC through the node's PCIe switch
            j = i * fab.nics_per_node // per
            pcie = c.link_spec(c.accelerator.host_link) if c.accelerator.host_link else nic
            _connect(
                g, devices[n * per + i], f"n{n}.nic{j}", rate(pcie), pcie.latency_us, pcie.name
            )
    if len(leaves) > 1:
        g.add_node("spine", kind="switch", latency_us=sw.latency_us)
        ports_per_leaf = {leaf: sum(1 for v in leaf_of.values() if v == leaf) for leaf in leaves}
        for leaf in leaves:
            uplinks = min(up, max(1, math.ceil(ports_per_leaf[leaf] / fab.oversubscription)))
            _connect(g, leaf, "spine", uplinks * sw.port_bandwidth_gbps, nic.latency_us, fab.switch)


def _torus(c: TorusCluster) -> Topology:
    g = nx.DiGraph()
    ln = c.link_spec(c.link)
    coords = list(itertools.product(*(range(d) for d in c.dims)))
    name = {xyz: "chip" + "_".join(map(str, xyz)) for xyz in coords}
    devices = [name[xyz] for xyz in coords]
    for idx, xyz in enumerate(coords):
        g.add_node(name[xyz], kind="device", coords=xyz, index=idx)
    for xyz in coords:
        for dim, size in enumerate(c.dims):
            if size == 1:
                continue
            nxt = list(xyz)
            nxt[dim] = xyz[dim] + 1
            if nxt[dim] == size:
                if not c.wraparound or size == 2:
                    continue  # an open mesh edge, or the size-2 ring's second link (below)
                nxt[dim] = 0
            links = c.links_per_neighbor * (2 if size == 2 and c.wraparound else 1)
            _connect(g, name[xyz], name[tuple(nxt)], links * rate(ln), ln.latency_us, ln.name)
    hosts: list[str] = []
    host_of: list[int] = []
    acc = c.accelerator
    host_link = c.link_spec(acc.host_link) if acc.host_link else None
    for idx, dev in enumerate(devices):
        h = idx // c.chips_per_host
        if h == len(hosts):
            hosts.append(f"host{h}")
            g.add_node(hosts[-1], kind="host")
        host_of.append(h)
        if host_link is not None:
            _connect(g, dev, hosts[h], rate(host_link), host_link.latency_us, host_link.name)
    return Topology(
        g,
        tuple(devices),
        tuple(hosts),
        tuple(host_of),
        c.host,
        (0,) * len(devices),
        tuple(range(len(devices))),
    )
