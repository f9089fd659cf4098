"""The parallel layout: data, tensor, pipeline and expert parallelism, and expert placement.

Convention of Megatron-Core and DeepSpeed-MoE: devices = dp x tp x pp; in each pipeline
stage the expert-parallel groups (ep ranks, each expert split over etp ranks) are carved
out of the stage's dp x tp ranks, so ep x etp must divide dp x tp.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen

A2AAlgorithm = Literal["direct", "hierarchical", "deepep"]
"""How an all-to-all is sent: directly, relayed through one device per node, or relayed
with each token sent once per node (DeepEP)."""


class ParallelismConfig(Frozen):
    """Degrees of parallelism and how experts map to expert-parallel ranks."""

    dp: int = Field(default=1, ge=1)
    """Data-parallel degree."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree of the dense (attention) part."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel degree (stages)."""
    ep: int = Field(default=1, ge=1)
    """Expert-parallel degree: ranks the experts of one layer are spread over."""
    etp: int = Field(default=1, ge=1)
    """Expert tensor parallelism: ranks each expert's FFN is split over."""
    a2a: A2AAlgorithm = "direct"
    """All-to-all algorithm: every pair directly; hierarchical (over the scale-up fabric to
    the source node's GPU on the destination's rail, then across nodes on that rail); or
    deepep (across nodes first, each token once per destination node, then to its experts
    inside the node; combine reduces inside the node first: DeepSeek-V3 / DeepEP)."""
    placement: Literal["contiguous", "round_robin"] | list[int] = "contiguous"
    """Expert -> EP rank: contiguous blocks, round-robin, or an explicit list (one EP rank per
    expert)."""

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp
