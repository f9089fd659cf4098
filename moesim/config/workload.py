"""What is simulated: one MoE layer, or online serving; training is a planned kind."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.serving import ServingWorkload

PLANNED_WORKLOADS = ("training",)
AVAILABLE_WORKLOADS = ("layer", "serving")


class LayerWorkload(Frozen):
    """One MoE layer forward pass over T tokens spread evenly over the data-parallel ranks."""

    kind: Literal["layer"]
    tokens: int = Field(ge=1)
    """Tokens in the whole batch (T), over all data-parallel ranks."""


WorkloadConfig = Annotated[LayerWorkload | ServingWorkload, Field(discriminator="kind")]

__all__ = ["AVAILABLE_WORKLOADS", "PLANNED_WORKLOADS", "LayerWorkload", "ServingWorkload"]
