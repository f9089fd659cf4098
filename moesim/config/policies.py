"""Policies: expert capacity, what happens to overflowing tokens, and offloading."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.offload import OffloadConfig


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
    offload: OffloadConfig = OffloadConfig()
    """Experts and optimizer states kept below device memory (default: nothing offloaded)."""
