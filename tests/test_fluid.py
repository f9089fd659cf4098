"""The analytic all-to-all for large exchanges (moesim.cost.fluid, the networks' batch
pricing, BatchedFlowNetwork, moesim.engine.bulk_exchange) against closed forms and the exact
flow-by-flow simulation; the network back-end chosen per layer."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import simpy

from moesim import rng
from moesim.cost.fluid import batch_finish_s
from moesim.engine.bulk_exchange import BulkExchange
from moesim.engine.layer_sim import layer_network, simulate_routed_layer
from moesim.engine.moe_layer import critical_path, dispatch_messages, traffic_arrays
from moesim.engine.network import EXACT_FLOWS, BatchedFlowNetwork, FlowNetwork
from moesim.loader import load_scenario, scenario_from_dict
from moesim.routing.distributions import popularity
from moesim.routing.route import route_layer
from moesim.system import System, build_system

DGX = {
    "name": "x",
    "cluster": "dgx-h100",
    "model": "mixtral-8x7b",
    "parallelism": {"dp": 8, "ep": 8},
    "workload": {"kind": "layer", "tokens": 1},
}


def _exact_arrivals(system: System, flows: list[tuple[int, int, float]]) -> np.ndarray:
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    events = net.transfer_many(flows)
    arrived = np.zeros(len(flows))
    for i, ev in enumerate(events):
        ev.callbacks.append(lambda _, i=i: arrived.__setitem__(i, env.now))
    env.run()
    return arrived


def _bulk_arrivals(system: System, flows: list[tuple[int, int, float]]) -> np.ndarray:
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    src, dst, nbytes = (np.array(x) for x in zip(*flows))
    return net.transfer_bulk(src, dst, nbytes)


def test_one_link_processor_sharing_closed_form() -> None:
    """Flows sharing one link: flow f is done after sum_g min(b_g, b_f) / C; the last after
    total / C; a link's backlog from an earlier batch is served first."""
    sizes = np.array([4.0, 1.0, 2.0, 2.0])
    cap = np.array([2.0, 99.0])
    flow = np.arange(4)
    edge = np.zeros(4, dtype=np.int64)
    t = batch_finish_s(10.0, flow, edge, sizes, cap, np.zeros(2))
    np.testing.assert_allclose(t.done_s, 10.0 + np.array([9.0, 4.0, 7.0, 7.0]) / 2.0)
    assert t.link_free_s[0] == pytest.approx(10.0 + 9.0 / 2.0)
    assert t.link_free_s[1] == 0.0  # unused link untouched
    later = batch_finish_s(12.0, np.array([0]), np.array([0]), np.array([1.0]), cap, t.link_free_s)
    assert later.done_s[0] == pytest.approx(t.link_free_s[0] + 0.5)


def test_a_flow_is_paced_by_its_busiest_link() -> None:
    """A two-hop flow finishes when the more loaded of its links is done with it."""
    cap = np.array([10.0, 1.0])
    t = batch_finish_s(
        0.0, np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([5.0, 5.0]), cap, np.zeros(2)
    )
    assert t.done_s[0] == pytest.approx(5.0)  # 5 bytes over the 1 B/s link
    assert t.done_s[1] == pytest.approx(1.0)  # 10 bytes over the 10 B/s link


def test_all_to_all_on_one_link_is_bytes_over_bandwidth_plus_latency() -> None:
    """GPU 0 of a DGX H100 sends to the 7 others: all cross its one NVSwitch uplink, so the
    last arrives after total bytes / bandwidth + route latency, exactly as flow by flow."""
    system = build_system(scenario_from_dict(DGX))
    flows = [(0, d, 1e6 * d) for d in range(1, 8)]
    bulk = _bulk_arrivals(system, flows)
    exact = _exact_arrivals(system, flows)
    uplink = system.paths.edge_ids(0, 1)[0]
    bw = system.paths.bandwidth_gbps[uplink] * 1e9
    closed = sum(b for _, _, b in flows) / bw + system.paths.latency_s(0, 1)
    assert bulk.max() == pytest.approx(closed, rel=1e-9)
    np.testing.assert_allclose(bulk, exact, rtol=1e-6)


def test_local_and_empty_flows_arrive_at_once() -> None:
    """Copies to self and zero-byte messages cost nothing and use no link."""
    system = build_system(scenario_from_dict(DGX))
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    out = net.transfer_bulk(np.array([3, 2, 1]), np.array([3, 5, 4]), np.array([1e6, 0.0, 1e3]))
    assert out[0] == 0.0 and out[1] == 0.0 and out[2] > 0
    assert net.sent_bytes == 1e3
    assert net.link_bytes.sum() == pytest.approx(1e3 * len(system.paths.edge_ids(1, 4)))


@pytest.mark.parametrize(
    ("cluster", "devices", "tolerance"),
    [("4x4-torus", 16, 0.01), ("tpu-v3-32", 16, 0.01), ("dgx-h100", 8, 1e-6)],
)
def test_random_all_to_all_agrees_with_flow_by_flow(
    cluster: str, devices: int, tolerance: float
) -> None:
    """A full all-to-all with random message sizes (0.5-2 MB), all starting together.

    The time of the last delivery (the phase's makespan) matches the exact max-min
    simulation: the busiest link's drain time. Each receiver's last arrival is an
    approximation: within 3% through a switch (two hops); on a torus or mesh never earlier
    than the exact one by more than 1% and later by ~5-8% on average, at most 50%, because
    per-link fair sharing cannot see that max-min favours flows whose other links are
    idle."""
    preset: object = cluster
    if cluster == "4x4-torus":
        preset = {"preset": "tpu-v3-2048", "dims": [4, 4]}  # with wraparound links
    system = build_system(
        scenario_from_dict({**DGX, "cluster": preset, "parallelism": {"dp": devices, "ep": 8}})
    )
    n = len(system.topology.devices)
    gen = np.random.default_rng(4)
    flows = [(s, d, float(gen.uniform(0.5e6, 2e6))) for s, d in itertools.permutations(range(n), 2)]
    bulk = _bulk_arrivals(system, flows)
    exact = _exact_arrivals(system, flows)
    assert bulk.max() == pytest.approx(exact.max(), rel=tolerance)
    dst = np.array([d for _, d, _ in flows])
    ratio = np.array([bulk[dst == d].max() / exact[dst == d].max() for d in range(n)])
    if cluster == "dgx-h100":
        np.testing.assert_allclose(ratio, 1.0, atol=0.03)
    assert ratio.min() >= 0.99 and ratio.max() <= 1.5 and ratio.mean() <= 1.1


def test_bulk_exchange_one_event_per_receiver() -> None:
    """Receivers' inbound events fire at their last message's arrival; the last sender is
    the one whose message came last; sources sending at one instant form one batch."""
    system = build_system(scenario_from_dict(DGX))
    env = simpy.Environment()
    net = FlowNetwork(env, system.paths)
    src = np.array([0, 1, 2, 3, 0])
    dst = np.array([4, 4, 4, 5, 0])
    nbytes = np.array([1e6, 3e6, 2e6, 1e6, 5e6])
    ex = BulkExchange(env, net, src, dst, nbytes)
    fired: dict[int, float] = {}
    for d in (4, 5, 0, 7):
        ex.inbound(d).callbacks.append(lambda _, d=d: fired.__setitem__(d, env.now))
    for s in (0, 1, 2, 3):
        ex.send(s)
    env.run()
    assert net.events == 1  # one batch
    assert fired[7] == 0.0 and fired[0] == 0.0  # nothing to receive / a local copy
    assert fired[4] == pytest.approx(np.nanmax(ex.arrived[dst == 4]))
    assert ex.last_sender(4) == 1
    assert fired[5] == pytest.approx(ex.arrived[3])


def _layer(system: System, tokens: int, bulk: bool) -> tuple[float, dict[str, float], int]:
    s = system.scenario
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    routing = route_layer(
        rng.stream(s.seed, "routing", 0), pop, system.layout, tokens, s.model, s.policies
    )
    costs = dataclasses.replace(system.layer_costs, bulk_a2a_min_flows=0 if bulk else 10**9)
    rec = simulate_routed_layer(dataclasses.replace(system, layer_costs=costs), routing)
    return rec.time_s, critical_path(rec.timeline), rec.network_events


@pytest.mark.parametrize(
    ("path", "overrides", "tokens", "tolerance"),
    [
        ("scenarios/quickstart.yaml", [], 8192, 0.002),
        ("scenarios/hot-expert-teaching.yaml", [], 8192, 0.002),
        ("scenarios/mixtral-etp-h100-fat-tree.yaml", [], 8192, 0.002),
        ("scenarios/switch-base-tpu-v3.yaml", [], 8192, 0.06),
    ],
    ids=["quickstart", "hot-expert", "fat-tree-etp", "tpu-v3-mesh"],
)
def test_layer_with_bulk_all_to_all_agrees_with_exact(
    path: str, overrides: list[str], tokens: int, tolerance: float
) -> None:
    """The whole MoE layer with the bulk all-to-all forced on matches the flow-by-flow layer
    (within 0.2% on switched clusters, skewed routing included; within 6% on the open mesh)
    with a fraction of the network events."""
    system = build_system(load_scenario(path, overrides))
    exact_s, exact_path, exact_events = _layer(system, tokens, bulk=False)
    bulk_s, bulk_path, bulk_events = _layer(system, tokens, bulk=True)
    assert bulk_s == pytest.approx(exact_s, rel=tolerance)
    assert bulk_path["compute"] == pytest.approx(exact_path["compute"], rel=tolerance)
    assert bulk_events < exact_events


def test_large_layers_use_the_bulk_exchange_by_default() -> None:
    """GLaM's EP 64 on 64 chips (4,096 messages a phase) is priced in batches by default and
    agrees with the exact layer to 0.1%."""
    system = build_system(
        load_scenario(
            "scenarios/glam-training-tpu-v4.yaml", ["cluster.dims=[4,4,4]", "parallelism.dp=8"]
        )
    )
    assert system.layer_costs.bulk_a2a_min_flows <= 4096
    tokens = 8 * 256
    exact_s, _, exact_events = _layer(system, tokens, bulk=False)
    bulk_s, _, bulk_events = _layer(system, tokens, bulk=True)
    assert bulk_s == pytest.approx(exact_s, rel=1e-3)
    assert bulk_events * 5 < exact_events


@pytest.mark.parametrize("a2a", ["hierarchical"])
def test_relayed_all_to_all_in_batches_agrees_with_exact(a2a: str) -> None:
    """Hierarchical exchanges priced in per-instant batches (DeepEP's are always priced in
    batches: test_deepep.py) (``BatchedFlowNetwork``) against the flow-by-flow simulation: DeepSeek-V3, EP 32 over 4
    H800 nodes (rail-optimized IB). Layer time within 2%, each phase within 3% (measured
    0.3-1.5% when written)."""
    from moesim.loader import load_scenario

    s = load_scenario("scenarios/deepseek-v3-ep32-h800.yaml", [f"parallelism.a2a={a2a}"])
    system = build_system(s)
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    routing = route_layer(
        rng.stream(s.seed, "routing", 0),
        pop,
        system.layout,
        16384,
        s.model,
        s.policies,
        system.expert_node,
    )
    out = {}
    for bulk in (False, True):
        costs = dataclasses.replace(system.layer_costs, bulk_a2a_min_flows=0 if bulk else 10**9)
        rec = simulate_routed_layer(dataclasses.replace(system, layer_costs=costs), routing)
        out[bulk] = (rec.time_s, critical_path(rec.timeline), rec.network_events)
    (t_exact, p_exact, ev_exact), (t_bulk, p_bulk, ev_bulk) = out[False], out[True]
    assert t_bulk == pytest.approx(t_exact, rel=0.02)
    for phase in ("dispatch", "combine"):
        assert p_bulk[phase] == pytest.approx(p_exact[phase], rel=0.03)
    assert ev_bulk < ev_exact  # batches, not a re-rating per flow


def _arrivals(net: FlowNetwork | BatchedFlowNetwork, flows: list[tuple[int, int, float]]):
    env = net.env
    arrived = np.zeros(len(flows))
    for i, ev in enumerate(net.transfer_many(flows)):
        ev.callbacks.append(lambda _, i=i: arrived.__setitem__(i, env.now))
    env.run()
    return arrived


def test_batched_network_prices_an_instant_as_one_batch() -> None:
    """Flows started at one instant (over several calls) on a ``BatchedFlowNetwork`` are one
    batch: one pricing, each delivery at its batch-priced arrival (``transfer_bulk``)."""
    system = build_system(scenario_from_dict(DGX))
    flows = [(s, d, 1e5 * (1 + s + d)) for s, d in itertools.permutations(range(8), 2)]
    env = simpy.Environment()
    net = BatchedFlowNetwork(env, system.paths)
    arrived = np.zeros(len(flows))
    half = len(flows) // 2
    for part, offset in ((flows[:half], 0), (flows[half:], half)):
        for i, ev in enumerate(net.transfer_many(part), start=offset):
            ev.callbacks.append(lambda _, i=i: arrived.__setitem__(i, env.now))
    env.run()
    assert net.events == 1
    np.testing.assert_allclose(arrived, _bulk_arrivals(system, flows), rtol=1e-12)
    assert net.sent_bytes == pytest.approx(sum(b for _, _, b in flows))


def test_flow_network_batching_window_is_relative_to_its_start() -> None:
    """More than ``EXACT_FLOWS`` flows in flight: completions are batched within a window
    that is a fraction of the network's elapsed time, not of the absolute clock, so the
    same flows started an hour into a run arrive after the same delays: to the clock's
    resolution there (a float at 3600 s is 4.5e-13 s apart; an absolute window of 1% of
    3600 s would finish every flow in the first round)."""
    system = build_system(scenario_from_dict(DGX))
    gen = np.random.default_rng(7)
    pairs = list(itertools.permutations(range(8), 2)) * 6
    flows = [(s, d, float(gen.uniform(0.5e6, 2e6))) for s, d in pairs]
    assert len(flows) > EXACT_FLOWS
    delays, events = [], []
    for start in (0.0, 3600.0):
        env = simpy.Environment(initial_time=start)
        env.run(until=start + 1e-3)  # the network is built, and used, later than t = start
        net = FlowNetwork(env, system.paths)
        env.run(until=start + 2e-3)
        delays.append(_arrivals(net, flows) - (start + 2e-3))
        events.append(net.events)
    np.testing.assert_allclose(delays[1], delays[0], rtol=0, atol=16 * np.spacing(3600.0))
    assert delays[1].max() == pytest.approx(delays[0].max(), rel=1e-9)
    assert events[0] == events[1] < len(flows)  # the window did batch completions


def test_layer_network_is_chosen_by_message_count() -> None:
    """Each simulated layer builds its own network: batched from ``bulk_a2a_min_flows``
    messages a phase, flow by flow below; ``dispatch_messages`` counts without building
    the message arrays."""
    s = load_scenario("scenarios/deepseek-v3-ep32-h800.yaml", ["parallelism.a2a=hierarchical"])
    system = build_system(s)
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    routing = route_layer(
        rng.stream(s.seed, "routing", 0), pop, system.layout, 2048, s.model, s.policies
    )
    n = dispatch_messages(routing, system.layout)
    assert n == len(traffic_arrays(routing, system.layout, 0)[0])
    for min_flows, kind in ((n, BatchedFlowNetwork), (n + 1, FlowNetwork)):
        costs = dataclasses.replace(system.layer_costs, bulk_a2a_min_flows=min_flows)
        chosen = dataclasses.replace(system, layer_costs=costs)
        assert type(layer_network(simpy.Environment(), chosen, routing)) is kind
