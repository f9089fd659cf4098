"""All-to-all exchanges: direct flows, and hierarchical relaying along rails."""

from __future__ import annotations

import simpy

from moesim.engine.exchange import Exchange
from moesim.engine.network import FlowNetwork
from moesim.loader import scenario_from_dict
from moesim.system import build_system

TWO_NODES = {
    "name": "x",
    "cluster": {"preset": "h100-rail", "nodes": 2},
    "model": "mixtral-8x7b",
    "parallelism": {"dp": 16, "ep": 8},
    "workload": {"kind": "layer", "tokens": 1},
}


def _run(algorithm: str, messages: list[tuple[int, int, float]]):
    system = build_system(scenario_from_dict(TWO_NODES))
    topo = system.topology
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    ex = Exchange(env, net, messages, algorithm, topo.node_of, topo.device_at, topo.local_of)
    for src in sorted({s for s, _, _ in messages}):
        ex.send(src)
    env.run(env.all_of(list(ex.delivered.values())))
    used = {system.paths.edges[i]: b for i, b in enumerate(net.link_bytes) if b > 0}
    return env.now, ex, used


def test_hierarchical_relays_on_the_destination_rail_and_aggregates() -> None:
    """n0.gpu0 and n0.gpu1 -> n1.gpu1: both reach n0.gpu1 first, then one message on rail 1."""
    mb = 64e6
    _, ex, used = _run("hierarchical", [(0, 9, mb), (1, 9, mb)])
    assert all(ev.triggered for ev in ex.delivered.values())
    nic_out = {e: b for e, b in used.items() if e[0].startswith("n0.nic")}
    assert nic_out == {("n0.nic1", "rail1"): 2 * mb}  # one aggregated message, rail 1 only
    assert used[("n0.gpu0", "n0.nvswitch")] == mb  # the first hop stays inside node 0


def test_direct_sends_every_message_separately() -> None:
    """Direct exchange: each message is its own flow; bytes are conserved on the rail."""
    mb = 64e6
    t, ex, used = _run("direct", [(0, 9, mb), (1, 9, mb)])
    assert set(ex.arrived_s) == {(0, 9), (1, 9)}
    assert sum(b for e, b in used.items() if e[0].startswith("n0.nic")) == 2 * mb
    assert t > 0


def test_same_node_messages_never_relay() -> None:
    """Inside one node the hierarchical exchange is the direct one."""
    mb = 8e6
    t_h, _, used_h = _run("hierarchical", [(0, 3, mb), (2, 5, mb)])
    t_d, _, used_d = _run("direct", [(0, 3, mb), (2, 5, mb)])
    assert used_h == used_d and t_h == t_d
