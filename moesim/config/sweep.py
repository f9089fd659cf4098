"""A sweep: many runs of one base scenario with fields varied, for capacity planning and
side-by-side design studies.

Points are the cartesian product of ``grid`` (every combination) crossed with ``zip``
(lists varied together, one value of each per point), each applied to ``base`` as
``--set`` overrides after ``set``. Keys are dotted field paths (``parallelism.ep``,
``workload.arrival.rate_per_s``, ``cluster.nodes``); values are any YAML value (a whole
mapping replaces the field). Each finished point is written atomically, so a sweep that
stops resumes where it stopped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen


class Bound(Frozen):
    """Feasibility bounds on one metric (either or both)."""

    max: float | None = None
    min: float | None = None


class Objectives(Frozen):
    """Metrics that define the Pareto front of the feasible points."""

    minimize: tuple[str, ...] = ()
    maximize: tuple[str, ...] = ()


class SweepConfig(Frozen):
    """One sweep file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """Sweep name; results go to ``<out>/sweeps/<name>/``."""
    description: str = ""
    base: str = Field(min_length=1)
    """The base scenario file, relative to the sweep file."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides applied to every point (dotted path -> value)."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted path -> values; every combination is a point."""
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted path -> values, varied together (all lists the same length)."""
    metrics: tuple[str, ...] = Field(min_length=1)
    """Summary entries to tabulate, as dotted paths into the run summary
    (``ttft_ms.p99``, ``throughput_tokens_per_s``, ``energy.energy_per_token_j``)."""
    constraints: dict[str, Bound] = Field(default_factory=dict)
    """Metric -> bounds a point must meet to be feasible (e.g. an SLO)."""
    objectives: Objectives = Objectives()
    """Metrics whose Pareto front among the feasible points is reported."""
    workers: int = Field(default=1, ge=1)
    """Runs at once."""
    executor: Literal["process", "ray"] = "process"
    """process: a local process pool; ray: a Ray cluster (``pip install moesim[ray]``;
    ``ray.init()`` connects to ``RAY_ADDRESS`` when set, else starts a local one)."""
    output_dir: str = Field(default="reports", min_length=1)
    """Parent folder of ``sweeps/<name>/``, relative to the working directory."""

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        problems = []
        sizes = {k: len(v) for k, v in self.zip.items()}
        if len(set(sizes.values())) > 1:
            problems.append(f"zip: every list must have the same length, got {sizes}")
        for table in ("grid", "zip"):
            for key, values in getattr(self, table).items():
                if not values:
                    problems.append(f"{table}: {key!r} has no values")
        both = set(self.grid) & set(self.zip)
        if both:
            problems.append(f"grid: {sorted(both)} are also in zip")
        tracked = set(self.metrics)
        missing = [
            m
            for m in (*self.constraints, *self.objectives.minimize, *self.objectives.maximize)
            if m not in tracked
        ]
        if missing:
            problems.append(f"metrics: must list {missing} (used by constraints or objectives)")
        if problems:
            raise ValueError("\n".join(problems))
        return self
