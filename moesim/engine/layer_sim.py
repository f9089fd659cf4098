"""One MoE layer forward pass simulated on the cluster: the ``layer`` workload's run, and
the ``LayerSimulator`` that prices each routing sample of
:class:`moesim.cost.layer_cost.MoELayerCost`.

Each simulated layer gets its own network, whose back-end is chosen here by the layer's
message count (:func:`layer_network`): flow by flow, or in per-instant batches for
exchanges of ``LayerCosts.bulk_a2a_min_flows`` messages or more."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import simpy

from moesim import rng
from moesim.config.scenario import Scenario
from moesim.config.workload import LayerWorkload
from moesim.cost.cost_store import default_store
from moesim.cost.layer_cost import LayerRun, MoELayerCost
from moesim.cost.padded import PaddedExperts
from moesim.derived.expert_replicas import route_replicated
from moesim.engine.moe_layer import (
    LayerTimeline,
    critical_path,
    dispatch_messages,
    run_layer,
    sent_routing,
)
from moesim.engine.netapi import Network
from moesim.engine.network import BatchedFlowNetwork, FlowNetwork
from moesim.routing.distributions import layer_popularities, popularity
from moesim.routing.replay import RoutingUse, recorded_choices, routing_feed
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System


@dataclass(frozen=True)
class LayerRecords:
    """Everything the layer simulation produced; reports are computed from this."""

    time_s: float
    routing: LayerRouting
    timeline: LayerTimeline
    link_bytes: np.ndarray
    sent_bytes: float
    """Bytes the exchanges actually put on the network (after relaying / deduplication)."""
    popularity: np.ndarray
    network_events: int
    sim_events: int
    routed: RoutingUse | None = None
    """What a trace or logits routing handed out (None for popularity sampling)."""


def layer_tokens(scenario: Scenario) -> int:
    """The batch size T of a ``layer`` scenario (TypeError for another workload)."""
    w = scenario.workload
    if not isinstance(w, LayerWorkload):
        raise TypeError(f"expected a 'layer' workload, got {w.kind!r}")
    return w.tokens


def simulate_layer(system: System) -> LayerRecords:
    """Route T tokens and simulate the layer on stage 0's devices."""
    s = system.scenario
    feed = routing_feed(s)
    choices = None
    if feed is None:
        pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    else:  # the first T tokens of the trace (or the logits model) at MoE layer 0
        pop = layer_popularities(s.routing, s.model.experts, 1, rng.stream(s.seed, "popularity"))[0]
        depth = s.model.experts if s.policies.overflow == "reroute" else s.model.top_k
        choices = recorded_choices(feed.take(layer_tokens(s))[:, 0, :], pop, depth)
    args = (system.layout, layer_tokens(s), s.model, s.policies, system.expert_node)
    gen = rng.stream(s.seed, "routing", 0)
    if system.placement is None:
        routing = route_layer(gen, pop, *args, choices)
    else:  # redundant experts: MoE layer 0's placement
        routing = route_replicated(gen, system.placement, 0, pop, *args, choices)
    rec = simulate_routed_layer(system, routing, pop)
    return rec if feed is None else replace(rec, routed=feed.use)


def padded_experts(system: System) -> PaddedExperts | None:
    """The system's capacity-padded expert layout (None: grouped GEMMs over kept tokens)."""
    s = system.scenario
    return PaddedExperts.of(s.policies, s.model)


def layer_network(env: simpy.Environment, system: System, routing: LayerRouting) -> Network:
    """The network one simulated layer runs on, built now: a :class:`BatchedFlowNetwork`
    when an all-to-all phase of the layer has at least ``bulk_a2a_min_flows`` messages
    (relayed exchanges of that size are priced in per-instant batches; direct ones use
    :class:`moesim.engine.bulk_exchange.BulkExchange` on either back-end), else a
    flow-by-flow :class:`FlowNetwork`. A padded layer's messages are those of its padded
    buffers (every rank to every expert device)."""
    sent = sent_routing(routing, padded_experts(system))
    if dispatch_messages(sent, system.layout) >= system.layer_costs.bulk_a2a_min_flows:
        return BatchedFlowNetwork(env, system.paths)
    return FlowNetwork(env, system.paths)


def simulate_routed_layer(
    system: System,
    routing: LayerRouting,
    pop: np.ndarray | None = None,
    start_s: float = 0.0,
) -> LayerRecords:
    """Simulate one layer whose routing outcome is given (sampled, or measured elsewhere).

    ``start_s`` is when on the simulated clock the layer starts (as deep in a long run);
    the layer's time and critical path do not depend on it."""
    env = simpy.Environment(initial_time=start_s)
    net = layer_network(env, system, routing)
    compute = [simpy.Resource(env, capacity=1) for _ in system.topology.devices]
    timeline = LayerTimeline(devices=len(system.topology.devices))
    done = env.process(
        run_layer(
            env,
            net,
            compute,
            system.layer_costs,
            routing,
            system.layout,
            0,
            timeline,
            padded_experts(system),
        )
    )
    steps = 0
    while env.peek() != float("inf"):
        env.step()
        steps += 1
    if not done.triggered:  # pragma: no cover - would be an engine bug
        raise RuntimeError("layer simulation ended before every rank combined its tokens")
    experts = system.scenario.model.experts
    return LayerRecords(
        time_s=max(timeline.rank_done_s.values(), default=start_s) - start_s,
        routing=routing,
        timeline=timeline,
        link_bytes=net.link_bytes.copy(),
        sent_bytes=net.sent_bytes,
        popularity=pop if pop is not None else np.full(experts, 1.0 / experts),
        network_events=net.events,
        sim_events=steps,
    )


def layer_run(system: System, routing: LayerRouting) -> LayerRun:
    """One routed layer simulated and reduced to what a layer cost needs."""
    rec = simulate_routed_layer(system, routing)
    path = critical_path(rec.timeline)
    return LayerRun(
        rec.time_s,
        path["dispatch"] + path["combine"],
        rec.link_bytes,
        rec.sim_events,
        rec.network_events,
    )


def simulated_layer_cost(system: System, samples: int = 3) -> MoELayerCost:
    """The memoized MoE layer cost of a system, each sample simulated on its network
    (priced buckets also kept in the process's cost store, if one is set:
    :func:`moesim.cost.cost_store.default_store`)."""
    return MoELayerCost(system, layer_run, samples, store=default_store())
