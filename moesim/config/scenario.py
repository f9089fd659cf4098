"""The whole scenario: one frozen record per concern, composed, plus the cross-field rules."""

from __future__ import annotations

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.cluster import ClusterConfig
from moesim.config.energy import EnergyConfig
from moesim.config.failures import FailuresConfig
from moesim.config.model import ModelConfig
from moesim.config.output import OutputConfig
from moesim.config.parallelism import ParallelismConfig
from moesim.config.policies import PoliciesConfig
from moesim.config.routing import RoutingConfig, UniformRouting
from moesim.config.workload import WorkloadConfig

SECTIONS = (
    "name",
    "description",
    "seed",
    "cluster",
    "model",
    "routing",
    "parallelism",
    "policies",
    "workload",
    "energy",
    "failures",
    "output",
)


class Scenario(Frozen):
    """A complete, validated description of one simulation."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """Scenario name; also the run folder's parent (letters, digits, '.', '_', '-')."""
    description: str = ""
    """Free text shown in reports."""
    seed: int = Field(default=0, ge=0)
    """Seed of every random stream of the run (routing, arrivals, failures)."""
    cluster: ClusterConfig
    """The hardware: a cluster preset name, a preset with overrides, or a full definition."""
    model: ModelConfig
    """The MoE model: a model preset name, a preset with overrides, or a full definition."""
    routing: RoutingConfig = UniformRouting(kind="uniform")
    """How tokens choose experts."""
    parallelism: ParallelismConfig = ParallelismConfig()
    """The parallel layout and expert placement."""
    policies: PoliciesConfig = PoliciesConfig()
    """Capacity and overflow policies."""
    workload: WorkloadConfig
    """What to simulate."""
    energy: EnergyConfig = EnergyConfig()
    """Facility energy inputs."""
    failures: FailuresConfig | None = None
    """Failure events and recovery (null = nothing fails)."""
    output: OutputConfig = OutputConfig()
    """Where results go."""
