"""What is simulated: one MoE layer, training steps, or online serving."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload

#: kinds recognised but not implemented yet (rejected with a clear message)
PLANNED_WORKLOADS: tuple[str, ...] = ()
AVAILABLE_WORKLOADS = ("layer", "training", "serving")


class LayerWorkload(Frozen):
    """One MoE layer forward pass over T tokens spread evenly over the data-parallel ranks."""

    kind: Literal["layer"]
    tokens: int = Field(ge=1)
    """Tokens in the whole batch (T), over all data-parallel ranks."""


WorkloadConfig = Annotated[
    LayerWorkload | TrainingWorkload | ServingWorkload, Field(discriminator="kind")
]

__all__ = [
    "AVAILABLE_WORKLOADS",
    "PLANNED_WORKLOADS",
    "LayerWorkload",
    "ServingWorkload",
    "TrainingWorkload",
]
