"""Runtime objects built from a validated scenario: topology, paths, costs, layout.

Everything downstream of the config (engine, reports) takes a ``System``; nothing here
reads files or mutates the scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario
from moesim.cost.compute import Roofline
from moesim.cost.layer_inputs import LayerCosts
from moesim.derived.expert_replicas import expert_placement
from moesim.layout import Layout
from moesim.layout.eplb import ExpertPlacement
from moesim.topology.graph import Topology, build
from moesim.topology.paths import PathTable
from moesim.units import COMBINE_BYTES, DISPATCH_BYTES, US


def _a2a_alpha_s(s: Scenario) -> float:
    """The measured all-to-all alpha of the cluster's profile, at the nearest world size."""
    profile = s.cluster.profile or s.cluster.accelerator.profile
    if profile is None:
        return 0.0
    fits = [c for c in profile.collectives if c.op == "all_to_all"]
    if not fits:
        return 0.0
    ep = s.parallelism.ep * s.parallelism.etp
    return min(fits, key=lambda c: abs(c.world - ep)).alpha_us * US


def _ep_host_overhead_s(s: Scenario) -> float:
    """The profile's host-side cost of an eager expert-parallel layer, where it applies:
    with data-dependent split sizes (dropless), which the host must read before the
    dispatch; a capacity-padded layer exchanges fixed-size buffers and needs no such read."""
    profile = s.cluster.profile or s.cluster.accelerator.profile
    ep = s.parallelism.ep * s.parallelism.etp
    pol = s.policies
    dropless = pol.capacity_factor is None or pol.overflow == "dropless"
    if profile is None or profile.ep_host_overhead_us is None or ep < 2 or not dropless:
        return 0.0
    return profile.ep_host_overhead_us * US if s.cluster.launch == "eager" else 0.0


@dataclass(frozen=True)
class System:
    """The simulated machine and model, ready for the engine."""

    scenario: Scenario
    topology: Topology
    paths: PathTable
    layout: Layout
    layer_costs: LayerCosts
    placement: ExpertPlacement | None = None
    """Which expert fills each slot of every MoE layer when the layout has redundant
    experts (``policies.experts``: EPLB); None without replicas."""

    @property
    def expert_node(self) -> np.ndarray | None:
        """Node of each expert per expert-data-parallel group, when the all-to-all sends a
        token once per node (``parallelism.a2a: deepep``); None otherwise."""
        if self.scenario.parallelism.a2a != "deepep":
            return None
        lay, node_of = self.layout, self.topology.node_of
        return np.array(
            [
                [
                    node_of[lay.expert_devices(0, g, int(lay.owner[e]))[0]]
                    for e in range(lay.experts)
                ]
                for g in range(lay.edp)
            ],
            dtype=np.int64,
        )


def build_system(s: Scenario) -> System:
    """Build the runtime objects of a scenario."""
    topo = build(s.cluster)
    m = s.model
    roofline = Roofline.of(
        s.cluster.accelerator, m.dtype, m.bytes_per_param, s.cluster.profile, s.cluster.launch
    )
    costs = LayerCosts(
        roofline=roofline,
        model=m,
        dispatch_bytes_per_token=m.d_model * DISPATCH_BYTES[m.dtype],
        combine_bytes_per_token=m.d_model * COMBINE_BYTES[m.dtype],
        expert_kernel=s.cluster.expert_kernel,
        a2a_overhead_s=_a2a_alpha_s(s),
        ep_host_overhead_s=_ep_host_overhead_s(s),
        a2a=s.parallelism.a2a,
        a2a_mode=s.parallelism.deepep_mode,
        topology=topo,
    )
    layout = Layout.of(s.parallelism, m.experts, s.policies.experts.redundant)
    return System(s, topo, PathTable(topo), layout, costs, expert_placement(s))
