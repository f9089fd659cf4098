"""All-to-all exchanges: direct flows, and hierarchical relaying along rails."""

from __future__ import annotations

from pathlib import Path

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


def test_inbound_waits_for_every_message_and_names_the_last_sender() -> None:
    """A receiver's inbound event fires with its last message; the last sender is the one
    whose message arrived last (a bigger message over the same rail arrives later)."""
    t, ex, _ = _run("direct", [(0, 9, 8e6), (1, 9, 64e6), (2, 3, 1e6)])
    assert ex.inbound(9).triggered and ex.last_sender(9) == 1
    assert ex.arrived_s[(1, 9)] == t > ex.arrived_s[(0, 9)]
    assert ex.last_sender(3) == 2 and ex.last_sender(7) is None


def test_same_node_messages_never_relay() -> None:
    """Inside one node the hierarchical exchange is the direct one."""
    mb = 8e6
    t_h, _, used_h = _run("hierarchical", [(0, 3, mb), (2, 5, mb)])
    t_d, _, used_d = _run("direct", [(0, 3, mb), (2, 5, mb)])
    assert used_h == used_d and t_h == t_d


def test_node_token_counts_counts_each_token_once_per_node() -> None:
    """A token with two experts on one node counts once there; dropped slots not at all."""
    import numpy as np

    from moesim.routing.route import node_token_counts

    expert_node = np.array([0, 0, 1, 1])  # experts 0-1 on node 0, 2-3 on node 1
    expert = np.array([[2, 3], [0, 2], [1, -1], [-1, -1]])
    assert node_token_counts(expert, expert_node, 2).tolist() == [2, 2]


def test_deepep_layer_moves_fewer_bytes_across_nodes_than_direct() -> None:
    """On DeepSeek-V3 over 4 nodes, deduplication cuts the bytes on the NICs."""
    import moesim

    def nic_bytes(a2a: str) -> float:
        path = Path(__file__).resolve().parent.parent / "scenarios" / "deepseek-v3-ep32-h800.yaml"
        s = moesim.load_scenario(str(path), [f"parallelism.a2a={a2a}", "workload.tokens=2048"])
        r = moesim.run(s)
        edges = r.system.paths.edges
        return sum(
            b
            for i, b in enumerate(r.records.link_bytes)
            if edges[i][0].startswith("rail") or edges[i][1].startswith("rail")
        )

    assert nic_bytes("deepep") < 0.9 * nic_bytes("direct")


def test_network_bytes_follow_the_algorithm() -> None:
    """Relaying adds wire bytes (two hops); deduplication removes some; slots stay the same."""
    import moesim

    path = Path(__file__).resolve().parent.parent / "scenarios" / "deepseek-v3-ep32-h800.yaml"
    out = {}
    for a2a in ("direct", "hierarchical", "deepep"):
        s = moesim.load_scenario(str(path), [f"parallelism.a2a={a2a}", "workload.tokens=1024"])
        out[a2a] = moesim.run(s).summary
    assert len({o["a2a_bytes"] for o in out.values()}) == 1
    assert out["hierarchical"]["network_bytes"] > out["direct"]["network_bytes"]
    assert out["direct"]["network_bytes"] == out["direct"]["a2a_bytes"]
