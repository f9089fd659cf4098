"""Policies: expert capacity, what happens to overflowing tokens, and offloading."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen
from moesim.config.offload import OffloadConfig


class ExpertsConfig(Frozen):
    """Redundant experts placed by a load balancer (DeepSeek-V3 report, section 3.4; the
    published EPLB, :mod:`moesim.layout.eplb`)."""

    redundant: int = Field(default=0, ge=0)
    """Replicas beyond the model's experts, per MoE layer: the layer has ``experts +
    redundant`` slots, ``(experts + redundant) / ep`` on each EP rank (DeepSeek-V3's
    decode: 32 redundant experts, 288 slots over EP144)."""
    balancer: Literal["eplb"] = "eplb"
    """What places the replicas: DeepSeek's EPLB (replicate the experts of largest load
    per replica, pack replicas onto GPUs balancing their load)."""
    policy: Literal["auto", "hierarchical", "global"] = "auto"
    """EPLB's policy: ``hierarchical`` packs expert groups onto nodes first (a group's
    experts stay on one node), ``global`` replicates and packs over all GPUs; ``auto``
    is EPLB's rule: hierarchical when the model's expert groups divide over the nodes."""
    statistics_tokens: int | None = Field(default=None, ge=1)
    """Load estimate the balancer works from: null, the configured routing popularity
    (the expected load); N, the counts of N tokens routed per MoE layer before the run
    (observed statistics, as deployments collect them)."""
    interval_s: float | None = Field(default=None, gt=0)
    """Re-balance every ``interval_s`` simulated seconds under a drifting routing
    (``routing.drift``): the summary compares the GPU load of a placement re-balanced
    on this period with one kept from the start (serving only)."""


class PoliciesConfig(Frozen):
    """Capacity and overflow handling, with the published semantics (GShard, Switch, Megatron)."""

    capacity_factor: float | None = Field(default=None, gt=0)
    """Per-expert capacity = ceil(capacity_factor x tokens x top_k / experts), per routing
    group (the tokens of one rank); null = unlimited."""
    overflow: Literal["drop", "reroute", "dropless"] = "drop"
    """drop: overflowing choices fall to the residual; reroute: they go to the token's next
    choice with free capacity; dropless: no capacity limit."""
    priority: Literal["token_order", "probability"] = "token_order"
    """Which choices fill slots first: all first choices in token order, then second choices
    (GShard); or highest router probability first (batch-prioritized routing)."""
    expert_compute: Literal["grouped", "padded"] = "grouped"
    """How experts compute: ``grouped``, grouped GEMMs over the kept tokens only (Megatron,
    MegaBlocks, vLLM); ``padded``, fixed ``[experts, capacity, d_model]`` buffers per routing
    group built with one-hot dispatch/combine masks and einsums over them (Mesh-TF, GShard,
    Switch Transformer): expert FLOPs and all-to-all bytes of the full capacity, plus the
    masks and einsums (:mod:`moesim.cost.padded`). ``padded`` needs a capacity_factor."""
    group_size: int | None = Field(default=None, gt=0)
    """Tokens per routing group of a ``padded`` layer: each rank's tokens are cut into
    groups of at most this many, each with its own capacity and masks (Mesh-TF's
    ``moe_group_size``, 1024 by default there); null = one group per rank (the Switch
    Transformer pseudocode: the tokens of a core). Capacity drops stay per rank."""
    mask_build: Literal["fused", "eager"] = "fused"
    """How a ``padded`` layer builds its one-hot masks: ``fused``, one fused elementwise
    chain writing each mask once (XLA: Mesh-TF / GShard on TPUs); ``eager``, op by op as
    PyTorch eager code does (compare, and, cast, accumulate, scale, accumulate per routing
    choice after zero-filling both masks), and the einsums copy their operands into the
    layout of their batched products."""
    offload: OffloadConfig = OffloadConfig()
    """Experts and optimizer states kept below device memory (default: nothing offloaded)."""
    experts: ExpertsConfig = ExpertsConfig()
    """Redundant expert replicas and their load balancer (default: none)."""

    @model_validator(mode="after")
    def _padded_needs_capacity(self) -> PoliciesConfig:
        if self.expert_compute == "padded" and self.capacity_factor is None:
            raise ValueError(
                "expert_compute: 'padded' sizes every expert buffer by the capacity, so it "
                "needs policies.capacity_factor (e.g. 1.25) and an overflow other than dropless"
            )
        for name, value, default in (
            ("group_size", self.group_size, None),
            ("mask_build", self.mask_build, "fused"),
        ):
            if value != default and self.expert_compute != "padded":
                raise ValueError(
                    f"{name}: applies to expert_compute 'padded' only, got expert_compute "
                    f"{self.expert_compute!r}"
                )
        return self
