"""Reference MoE layer: a real forward pass on numpy arrays, the ground truth for routing.

Pure numpy, no SimPy. ``layer.forward`` routes tokens (``gating``), applies capacity and
overflow through ``moesim.routing.assignment.assign`` (shared with the simulator), dispatches
by gather / scatter (``dispatch``) to the expert FFNs (``experts``) and reports aux
quantities (``metrics``); ``layer.dense_forward`` is the every-expert-on-every-token check.
"""

from __future__ import annotations

from moesim.reference.dispatch import DispatchPlan, build_plan
from moesim.reference.experts import ExpertWeights, init_experts
from moesim.reference.layer import (
    LayerOutput,
    ReferenceLayer,
    Route,
    RouterKind,
    RoutingSpec,
    dense_forward,
    forward,
    route,
)
from moesim.reference.metrics import AuxMetrics

__all__ = [
    "AuxMetrics",
    "DispatchPlan",
    "ExpertWeights",
    "LayerOutput",
    "ReferenceLayer",
    "Route",
    "RouterKind",
    "RoutingSpec",
    "build_plan",
    "dense_forward",
    "forward",
    "init_experts",
    "route",
]
