"""What is simulated: one MoE layer (now); training and serving are planned kinds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.config.base import Frozen

PLANNED_WORKLOADS = ("training", "serving")


class LayerWorkload(Frozen):
    """One MoE layer forward pass over T tokens spread evenly over the data-parallel ranks."""

    kind: Literal["layer"]
    tokens: int = Field(ge=1)
    """Tokens in the whole batch (T), over all data-parallel ranks."""


WorkloadConfig = Annotated[LayerWorkload, Field(discriminator="kind")]
