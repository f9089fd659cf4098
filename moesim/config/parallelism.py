"""The parallel layout: data, tensor, pipeline and expert parallelism, and expert placement.

Convention of Megatron-Core and DeepSpeed-MoE: devices = dp x tp x pp; in each pipeline
stage the expert-parallel groups (ep ranks, each expert split over etp ranks) are carved
out of the stage's dp x tp ranks, so ep x etp must divide dp x tp.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from moesim.config.base import Frozen

A2AAlgorithm = Literal["direct", "hierarchical", "deepep"]
"""How an all-to-all is sent: directly, relayed through one device per node, or relayed
with each token sent once per node (DeepEP)."""

DeepEPMode = Literal["normal", "low_latency"]
"""DeepEP's two kernel families (github.com/deepseek-ai/DeepEP): ``normal`` (NVLink
forwarding inside the node, RDMA between nodes once per destination node: training and
prefill) and ``low_latency`` (each token to each of its experts' GPUs directly: decode)."""


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
    a2a_mode: DeepEPMode | None = None
    """DeepEP's kernels (only with ``a2a: deepep``): ``normal`` (the default: across nodes
    once per destination node to the GPU on the source's rail, then over NVLink to each
    expert GPU, pipelined; combine reduces inside the node first) or ``low_latency`` (each
    token straight to each of its experts' GPUs, RDMA across nodes and NVLink inside,
    combine reduced at the receiver). Priced by :mod:`moesim.engine.deepep`."""
    placement: Literal["contiguous", "round_robin"] | list[int] = "contiguous"
    """Expert -> EP rank: contiguous blocks, round-robin, or an explicit list (one EP rank per
    expert)."""

    @field_validator("a2a_mode")
    @classmethod
    def _mode_needs_deepep(cls, mode: DeepEPMode | None, info: ValidationInfo) -> DeepEPMode | None:
        a2a = info.data.get("a2a")
        if mode is not None and a2a is not None and a2a != "deepep":
            raise ValueError(
                f"a2a_mode is DeepEP's kernel choice: needs a2a: deepep, got a2a: {a2a}"
            )
        return mode

    @property
    def deepep_mode(self) -> DeepEPMode | None:
        """The DeepEP kernels in use: ``a2a_mode`` (``normal`` when not given) with
        ``a2a: deepep``; None with any other algorithm."""
        if self.a2a != "deepep":
            return None
        return self.a2a_mode or "normal"

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp
