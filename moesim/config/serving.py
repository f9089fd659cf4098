"""The ``serving`` workload: requests arrive, a continuous-batching server answers them.

Arrivals are a Poisson process, a Gamma renewal process (bursty), or a replayed trace;
prompt and output lengths come from tagged distributions (constant, uniform, lognormal),
clamped to ``[min, max]`` after rounding to whole tokens. The scheduler follows vLLM's
(Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023): a token budget per iteration, a cap on running sequences,
optional chunked prefill, and a KV cache in fixed-size blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen
from moesim.config.engine import EngineConfig
from moesim.config.pools import PoolsConfig
from moesim.config.speculative import SpeculativeConfig

# --- arrival processes ---------------------------------------------------------------------


class PoissonArrival(Frozen):
    """Requests arrive as a Poisson process: exponential inter-arrival times."""

    kind: Literal["poisson"]
    rate_per_s: float = Field(gt=0)
    """Mean arrival rate, requests per second."""


class GammaArrival(Frozen):
    """A Gamma renewal process: inter-arrival times ~ Gamma(shape = 1/cv**2,
    scale = cv**2 / rate_per_s), so their mean is 1/rate_per_s and their coefficient of
    variation is ``cv`` (cv = 1 is Poisson, cv > 1 bursty, cv < 1 smoother); the arrival
    model of vLLM's ``benchmark_serving.py --burstiness`` (burstiness = 1/cv**2)."""

    kind: Literal["gamma"]
    rate_per_s: float = Field(gt=0)
    """Mean arrival rate, requests per second."""
    cv: float = Field(gt=0)
    """Coefficient of variation (std / mean) of the inter-arrival times."""


class TraceArrival(Frozen):
    """Replay of recorded requests: arrival time, prompt and output length of each.

    Give ``path``, a CSV file with a header row and columns ``arrival_s, prompt_tokens,
    output_tokens`` (relative to the scenario file); the loader reads it and embeds its rows
    here, so the resolved scenario of a run folder is self-contained. Or give the three
    columns inline. Requests arriving at or after ``duration_s`` are not simulated.
    """

    kind: Literal["trace"]
    path: str | None = None
    """CSV file to read (relative to the scenario file); replaced by its rows on load."""
    source: str = "inline"
    """Where the rows came from (the CSV path as written), for the record."""
    arrival_s: tuple[float, ...] = ()
    """Arrival time of each request, seconds from the start, non-decreasing."""
    prompt_tokens: tuple[int, ...] = ()
    """Prompt length of each request, tokens."""
    output_tokens: tuple[int, ...] = ()
    """Output length of each request, tokens (including the first, produced by prefill)."""

    @model_validator(mode="after")
    def _columns(self) -> TraceArrival:
        problems = list(self._problems())
        if problems:
            raise ValueError("\n".join(f"{f}: {m}" for f, m in problems))
        return self

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.path is not None:
            yield "path", "a trace path must be read by the scenario loader (load_scenario)"
            return
        n = len(self.arrival_s)
        if n == 0:
            yield "arrival_s", "a trace needs at least one request"
        for name in ("prompt_tokens", "output_tokens"):
            col = getattr(self, name)
            if len(col) != n:
                yield name, f"has {len(col)} rows, arrival_s has {n}"
            bad = next((i for i, v in enumerate(col) if v < 1), None)
            if bad is not None:
                yield name, f"must be >= 1 tokens, got {col[bad]} in row {bad + 1}"
        bad = next((i for i, t in enumerate(self.arrival_s) if t < 0), None)
        if bad is not None:
            yield "arrival_s", f"must be >= 0, got {self.arrival_s[bad]} in row {bad + 1}"
        back = next((i for i in range(1, n) if self.arrival_s[i] < self.arrival_s[i - 1]), None)
        if back is not None:
            yield "arrival_s", f"must be non-decreasing; row {back + 1} goes back in time"


ArrivalConfig = Annotated[PoissonArrival | GammaArrival | TraceArrival, Field(discriminator="kind")]

# --- length distributions ------------------------------------------------------------------


class _Clamped(Frozen):
    min: int = Field(default=1, ge=1)
    """Lengths below this are raised to it, tokens."""
    max: int | None = Field(default=None, ge=1)
    """Lengths above this are lowered to it, tokens; None = no upper clamp."""

    def _clamp_problems(self) -> Iterator[tuple[str, str]]:
        if self.max is not None and self.max < self.min:
            yield "max", f"must be >= min ({self.min}), got {self.max}"

    @model_validator(mode="after")
    def _consistent(self) -> _Clamped:
        problems = list(self._problems())
        if problems:
            raise ValueError("\n".join(f"{f}: {m}" for f, m in problems))
        return self

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from self._clamp_problems()


class ConstantLength(_Clamped):
    """Every request has the same length."""

    kind: Literal["constant"]
    value: int = Field(ge=1)
    """The length, tokens."""

    @property
    def upper_tokens(self) -> int | None:
        """The largest length this distribution can produce, tokens."""
        return min(self.value, self.max) if self.max is not None else max(self.value, self.min)


class UniformLength(_Clamped):
    """Lengths uniform over the integers ``low .. high`` (both included)."""

    kind: Literal["uniform"]
    low: int = Field(ge=1)
    """Smallest length, tokens."""
    high: int = Field(ge=1)
    """Largest length, tokens."""

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from self._clamp_problems()
        if self.low > self.high:
            yield "low", f"must be <= high ({self.high}), got {self.low}"

    @property
    def upper_tokens(self) -> int | None:
        return min(self.high, self.max) if self.max is not None else max(self.high, self.min)


class LognormalLength(_Clamped):
    """Lengths ~ LogNormal(mu, sigma) with mu = ln(mean) - sigma**2 / 2, so the (unclamped)
    mean is ``mean`` and ``sigma`` is the standard deviation of ln(length) (numpy's
    ``lognormal(mu, sigma)``); rounded to whole tokens, then clamped. Request lengths of
    chat traces are close to log-normal (e.g. the ShareGPT and Azure LLM inference traces).
    """

    kind: Literal["lognormal"]
    mean: float = Field(gt=0)
    """Mean of the unclamped, unrounded distribution, tokens."""
    sigma: float = Field(default=0.5, ge=0)
    """Standard deviation of ln(length); 0 gives the constant ``mean``."""

    @property
    def mu(self) -> float:
        """Mean of ln(length)."""
        return math.log(self.mean) - self.sigma**2 / 2

    @property
    def upper_tokens(self) -> int | None:
        if self.sigma == 0:
            v = max(round(self.mean), self.min)
            return min(v, self.max) if self.max is not None else v
        return self.max


LengthConfig = Annotated[
    ConstantLength | UniformLength | LognormalLength, Field(discriminator="kind")
]

# --- scheduler, SLO, workload --------------------------------------------------------------


class SchedulerConfig(Frozen):
    """Continuous batching as vLLM (v1) does it, per data-parallel rank."""

    max_batch_tokens: int = Field(default=8192, ge=1)
    """Tokens one iteration may process per data-parallel rank: decodes (one each) plus
    prefill tokens (vLLM ``max_num_batched_tokens``)."""
    max_seqs: int = Field(default=256, ge=1)
    """Sequences running at once per data-parallel rank (vLLM ``max_num_seqs``)."""
    chunked_prefill: bool = True
    """Split long prompts over iterations to fill the token budget; off: a prompt is
    prefilled whole, in one iteration, or waits."""
    block_tokens: int = Field(default=16, ge=1)
    """Tokens per KV-cache block (PagedAttention block size)."""
    admit_free_fraction: float = Field(default=0.0, ge=0, lt=1)
    """A waiting request is admitted beside running ones only while at least this share
    of the KV blocks is free (vLLM: 0; transformers' FIFO scheduler: 0.15, its
    ``safety_margin``)."""
    requeue: Literal["front", "back"] = "front"
    """Where a preempted request waits again: first in line (vLLM) or last (transformers,
    which re-creates it as a new request)."""


class SloConfig(Frozen):
    """Service-level objectives a request must meet to count as served well."""

    ttft_ms: float = Field(gt=0)
    """Time to first token target, milliseconds."""
    tpot_ms: float = Field(gt=0)
    """Time per output token target (after the first), milliseconds."""


class ServingWorkload(Frozen):
    """Online serving: an arrival process, request lengths, a continuous-batching server."""

    kind: Literal["serving"]
    duration_s: float = Field(gt=0)
    """Simulated time during which requests arrive, seconds; the run then drains (until
    every arrived request finished, at most 10 x duration_s in all)."""
    warmup_s: float = Field(default=0.0, ge=0)
    """Requests arriving before this are served but left out of the metrics, seconds."""
    arrival: ArrivalConfig
    """How requests arrive."""
    prompt_tokens: LengthConfig | None = None
    """Prompt length distribution (required unless the arrival is a trace)."""
    output_tokens: LengthConfig | None = None
    """Output length distribution (required unless the arrival is a trace)."""
    engine: EngineConfig = EngineConfig()
    """The serving engine (a preset of ``moesim/catalog/data/engines.yaml``, default
    ``ideal``): its scheduler defaults and host-side cost per iteration."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """The batching scheduler (the engine's defaults, with the scenario's fields over them)."""
    slo: SloConfig | None = None
    """Latency targets for SLO attainment; None = not reported."""
    kv_cache_fraction: float = Field(default=0.9, gt=0, le=1)
    """Fraction of each device's memory left after the weights that holds KV blocks (the
    rest: activations, workspace, fragmentation)."""
    pools: PoolsConfig | None = None
    """Prefill/decode disaggregation (:mod:`moesim.config.pools`); None: co-located, every
    rank prefills and decodes (the scenario's ``parallelism``)."""
    speculative: SpeculativeConfig | None = None
    """Multi-token prediction / speculative decoding in decode steps
    (:mod:`moesim.config.speculative`); None: one token per decode step."""

    @model_validator(mode="after")
    def _consistent(self) -> ServingWorkload:
        problems = list(self._problems())
        if problems:
            raise ValueError("\n".join(f"{f}: {m}" for f, m in problems))
        return self

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.warmup_s >= self.duration_s:
            yield "warmup_s", f"must be < duration_s ({self.duration_s}), got {self.warmup_s}"
        trace = isinstance(self.arrival, TraceArrival)
        for name in ("prompt_tokens", "output_tokens"):
            given = getattr(self, name) is not None
            if trace and given:
                yield name, "comes from the trace; leave it out with arrival kind 'trace'"
            elif not trace and not given:
                yield name, f"required with arrival kind {self.arrival.kind!r}"
        if not self.scheduler.chunked_prefill:
            longest = self.longest_request_tokens
            budget = self.scheduler.max_batch_tokens
            if longest is None:
                yield (
                    "scheduler.chunked_prefill",
                    "without chunked prefill every request (prompt + output, recomputed "
                    "after a preemption) must fit max_batch_tokens: give the length "
                    "distributions a max",
                )
            elif longest > budget:
                yield (
                    "scheduler.max_batch_tokens",
                    f"without chunked prefill it must be >= the longest request (prompt + "
                    f"output = {longest} tokens), got {budget}",
                )

    @property
    def longest_request_tokens(self) -> int | None:
        """Upper bound of prompt + output tokens of one request; None if unbounded."""
        if isinstance(self.arrival, TraceArrival):
            a = self.arrival
            return max((p + o for p, o in zip(a.prompt_tokens, a.output_tokens)), default=0)
        if self.prompt_tokens is None or self.output_tokens is None:
            return None
        p, o = self.prompt_tokens.upper_tokens, self.output_tokens.upper_tokens
        return None if p is None or o is None else p + o
