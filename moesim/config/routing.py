"""Routing distributions: how popular each expert is, from which token choices are sampled.

A token's k experts are drawn without replacement in proportion to the experts'
popularity (Gumbel-top-k), which also ranks all remaining experts for rerouting.
Popularity ranks follow expert ids (expert 0 the most popular) unless ``permute`` is set.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

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


class PopularityRouting(_Common):
    """An explicit popularity: measured per-expert shares or counts (normalized to sum 1),
    in expert-id order; its length must be the model's experts."""

    kind: Literal["popularity"]
    weights: tuple[float, ...] = Field(min_length=1)
    """One weight per expert, >= 0, not all zero (counts or shares: they are normalized)."""

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [i for i, w in enumerate(v) if w < 0]
        if bad:
            raise ValueError(f"weights[{bad[0]}] is {v[bad[0]]}: weights must be >= 0")
        if sum(v) <= 0:
            raise ValueError("weights are all zero: at least one expert must be chosen")
        return v


class _Replayed(Frozen):
    """Routing that produces each token's choices itself (per layer, in order) rather than
    from one popularity: no permutation, no drift, layers as the data has them."""

    permute: ClassVar[bool] = False
    drift: ClassVar[DriftConfig | None] = None
    layers: ClassVar[str] = "independent"


class TraceRouting(_Replayed):
    """Replay of recorded routing (docs/routing.md): each token's top-k experts at every MoE
    layer, in order, from a JSON-lines or ``.npz`` file; consumed in order by the workload,
    starting again from the first token when it needs more (the summary says how often)."""

    kind: Literal["trace"]
    path: str = Field(min_length=1)
    """The trace file, relative to the scenario file (the loader makes it absolute)."""
    source: str = ""
    """The path as written, for the record (set by the loader)."""


class LogitsPhase(Frozen):
    """The logits model's parameters for decode tokens (``routing.decode``), where a trace
    shows decode routing differently from the prompt's: each field left out is the
    prompt's (the section above it)."""

    bias: tuple[tuple[float, ...], ...] | None = None
    """Per-expert bias of decode tokens (one row, or one per MoE layer)."""
    noise_std: float | None = Field(default=None, ge=0)
    token_correlation: float | None = Field(default=None, ge=0, lt=1)
    correlated_share: float | None = Field(default=None, ge=0, le=1)

    @field_validator("bias", mode="before")
    @classmethod
    def _rows(cls, v: object) -> object:
        if isinstance(v, list | tuple) and v and all(isinstance(x, int | float) for x in v):
            return (tuple(v),)
        return v


class LogitsRouting(_Replayed):
    """Router logits as a per-expert bias plus Gaussian token noise; each token takes the
    top_k of ``bias + noise_std x z`` (z standard normal per token, layer and expert,
    optionally AR(1)-correlated over consecutive tokens, in a share of its variance, and
    across consecutive MoE layers).
    ``moesim routing fit TRACE`` fits it to a recorded trace."""

    kind: Literal["logits"]
    bias: tuple[tuple[float, ...], ...] = Field(min_length=1)
    """Per-expert bias: one row for every MoE layer, or one row per MoE layer."""
    noise_std: float = Field(default=1.0, ge=0)
    """Standard deviation of the token noise, in logit units."""
    token_correlation: float = Field(default=0.0, ge=0, lt=1)
    """AR(1) coefficient of a token's noise on the previous token's (temporal locality)."""
    correlated_share: float = Field(default=1.0, ge=0, le=1)
    """Share of the noise variance that carries ``token_correlation``; the rest is drawn
    afresh for every token (1: all of it, the plain AR(1))."""
    layer_correlation: float = Field(default=0.0, ge=0, lt=1)
    """AR(1) coefficient of a token's noise at a MoE layer on its noise at the previous one."""
    decode: LogitsPhase | None = None
    """Decode tokens' own parameters (serving: the one-token steps of running requests;
    the fields above are then the prompt tokens'); None: every token alike."""

    def for_decode(self) -> LogitsRouting:
        """The model decode tokens follow (this one, with ``decode``'s fields)."""
        d = self.decode
        if d is None:
            return self
        update = {k: v for k, v in d.model_dump().items() if v is not None}
        return self.model_copy(update={**update, "decode": None})

    @field_validator("bias", mode="before")
    @classmethod
    def _rows(cls, v: object) -> object:
        if isinstance(v, list | tuple) and v and all(isinstance(x, int | float) for x in v):
            return (tuple(v),)  # one flat row: every layer
        return v

    @field_validator("bias")
    @classmethod
    def _same_width(cls, v: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        if any(len(r) != len(v[0]) for r in v):
            raise ValueError("every bias row must have one value per expert (same length)")
        return v

    @model_validator(mode="after")
    def _decode_width(self) -> LogitsRouting:
        d = self.decode
        if (
            d is not None
            and d.bias is not None
            and any(len(r) != len(self.bias[0]) for r in d.bias)
        ):
            raise ValueError("decode.bias rows must have as many values as bias rows")
        return self


RoutingConfig = Annotated[
    UniformRouting
    | ZipfRouting
    | DirichletRouting
    | HotRouting
    | PopularityRouting
    | TraceRouting
    | LogitsRouting,
    Field(discriminator="kind"),
]
