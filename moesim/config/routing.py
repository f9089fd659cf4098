"""Routing distributions: how popular each expert is, from which token choices are sampled.

A token's k experts are drawn without replacement in proportion to the experts'
popularity (Gumbel-top-k), which also ranks all remaining experts for rerouting.
Popularity ranks follow expert ids (expert 0 the most popular) unless ``permute`` is set.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.config.base import Frozen


class DriftConfig(Frozen):
    """Popularity that moves over simulated time: the hot set rotates through the experts.

    At time t the expert ``e`` gets the base popularity of expert ``e - t / period_s``
    (mod experts), interpolated linearly between whole shifts, so after ``period_s``
    seconds every expert has taken its neighbour's popularity and after
    ``experts x period_s`` the pattern is back where it started. Used where time exists
    (serving with expert offloading); the expected per-layer costs use the base popularity.
    """

    period_s: float = Field(gt=0)
    """Simulated seconds for the popularity to shift by one expert."""


class _Common(Frozen):
    permute: bool = False
    """Shuffle which expert ids get which popularity (seeded), instead of expert 0 hottest."""
    drift: DriftConfig | None = None
    """Make the popularity drift over time (see DriftConfig); null = fixed popularity."""
    layers: Literal["same", "independent"] = "same"
    """same: every MoE layer routes with one popularity; independent: each MoE layer has
    its own (its own Dirichlet draw, or its own seeded shuffle of the Zipf / hot ranking;
    uniform stays uniform), as trained routers differ by layer. Layer costs then average
    routing samples spread over the layers; offloading uses each layer's own."""


class UniformRouting(_Common):
    """Every expert equally likely: the balanced ideal."""

    kind: Literal["uniform"]


class ZipfRouting(_Common):
    """Power-law popularity: the expert of rank r (1-based) has weight r**-s."""

    kind: Literal["zipf"]
    s: float = Field(ge=0)
    """Zipf exponent; 0 is uniform, larger is more skewed."""


class DirichletRouting(_Common):
    """Popularity drawn once per run from a symmetric Dirichlet(alpha)."""

    kind: Literal["dirichlet"]
    alpha: float = Field(gt=0)
    """Concentration; large is near-uniform, small (< 1) is very skewed."""


class HotRouting(_Common):
    """A fraction of the experts receives a given share of the routing mass."""

    kind: Literal["hot"]
    hot_fraction: float = Field(gt=0, lt=1)
    """Fraction of the experts that are hot (rounded to at least one expert)."""
    hot_share: float = Field(gt=0, lt=1)
    """Share of routing probability mass the hot experts receive together."""


RoutingConfig = Annotated[
    UniformRouting | ZipfRouting | DirichletRouting | HotRouting, Field(discriminator="kind")
]
