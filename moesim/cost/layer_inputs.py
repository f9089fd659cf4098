"""The per-device cost inputs of one MoE layer: the device roofline, the model shape, the
bytes each token carries through dispatch and combine, and the measured fixed costs of an
all-to-all and of an eager expert-parallel layer's host-side work."""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.model import ModelConfig
from moesim.config.parallelism import A2AAlgorithm, DeepEPMode
from moesim.cost.compute import ExpertKernel, Roofline
from moesim.topology.graph import Topology

BULK_A2A_MIN_FLOWS = 2048
"""Direct all-to-all phases with this many messages or more are priced in batches."""


@dataclass(frozen=True)
class LayerCosts:
    """Per-device cost inputs of a layer: the device roofline and the model shape."""

    roofline: Roofline
    model: ModelConfig
    dispatch_bytes_per_token: int
    combine_bytes_per_token: int
    expert_kernel: ExpertKernel = "grouped"
    a2a_overhead_s: float = 0.0
    """Fixed cost of one all-to-all phase (a measured collective's alpha), on top of the
    links' own latencies."""
    ep_host_overhead_s: float = 0.0
    """Host-side cost of an eager expert-parallel layer (reading the split sizes), spent by
    every rank between its gate and its dispatch (the device profile's
    ``ep_host_overhead_us``; 0 with one expert-parallel rank or CUDA graphs)."""
    a2a: A2AAlgorithm = "direct"
    """All-to-all algorithm: direct or hierarchical (see moesim.engine.exchange)."""
    a2a_mode: DeepEPMode | None = None
    """DeepEP's kernels with ``a2a: deepep`` (:mod:`moesim.engine.deepep`); None otherwise."""
    topology: Topology | None = None
    """The cluster (device -> node and local index) for hierarchical exchanges."""
    bulk_a2a_min_flows: int = BULK_A2A_MIN_FLOWS
    """A direct all-to-all phase with at least this many messages is priced in batches
    (:class:`moesim.engine.bulk_exchange.BulkExchange`) instead of flow by flow."""
