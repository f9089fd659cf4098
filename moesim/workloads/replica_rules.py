"""Rules of redundant experts (``policies.experts``), common to every workload kind: the
slots fill the EP ranks evenly, EPLB's hierarchical policy fits the nodes, and the
features replicas are not modelled with are refused."""

from __future__ import annotations

from moesim.config.scenario import Scenario
from moesim.config.training import TrainingWorkload
from moesim.derived.expert_replicas import ep_nodes
from moesim.layout.eplb import chosen_policy
from moesim.workloads.base import Rule


def replica_rules(s: Scenario) -> Rule:
    """Redundant experts are consistent with the layout and the rest of the scenario."""
    cfg, m, p = s.policies.experts, s.model, s.parallelism
    slots = m.experts + cfg.redundant
    if slots % p.ep:
        what = f"model.experts ({m.experts})"
        if cfg.redundant:
            what = f"the expert slots, model.experts + policies.experts.redundant ({slots})"
        yield "parallelism.ep", f"must divide {what}, got {p.ep}"
    if cfg.redundant == 0:
        for name, value, default in (
            ("policy", cfg.policy, "auto"),
            ("statistics_tokens", cfg.statistics_tokens, None),
            ("interval_s", cfg.interval_s, None),
        ):
            if value != default:
                yield f"policies.experts.{name}", "applies to redundant experts only; set redundant"
        return
    if isinstance(p.placement, list):
        yield (
            "parallelism.placement",
            "with redundant experts the load balancer places the experts; leave placement out",
        )
    groups, nodes = m.expert_groups or 1, ep_nodes(s)
    if cfg.policy == "hierarchical" and (
        groups % nodes or m.experts % groups or slots % nodes or p.ep % nodes
    ):
        yield (
            "policies.experts.policy",
            f"hierarchical needs the model's {groups} expert groups, and the {slots} slots, "
            f"to divide over the EP group's {nodes} nodes; use 'global' or 'auto' (here: "
            f"{chosen_policy('auto', groups, nodes)})",
        )
    if cfg.interval_s is not None and s.routing.drift is None:
        yield (
            "policies.experts.interval_s",
            "re-balancing follows a drifting routing: give routing.drift, or leave it out",
        )
    if isinstance(s.workload, TrainingWorkload):
        yield "policies.experts.redundant", "redundant experts are modelled for serving and layers"
    if s.failures is not None:
        yield "policies.experts.redundant", "redundant experts with failures are not modelled yet"
    if s.policies.offload.experts is not None:
        yield (
            "policies.experts.redundant",
            "redundant experts with expert offloading are not modelled yet",
        )
    if s.policies.expert_compute == "padded":
        yield (
            "policies.experts.redundant",
            "redundant experts with padded expert compute are not modelled yet "
            "(capacity is per logical expert there); use expert_compute: grouped",
        )
