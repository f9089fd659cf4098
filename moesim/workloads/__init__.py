"""Workload kinds by ``workload.kind``: each kind's rules, simulation, summary, energy,
traces, table and plots. Uses everything below it (engine, cost, failures, energy,
report); the loader, the API, sweeps and the CLI use it instead of branching on the kind.

A new workload kind is one module here implementing :class:`WorkloadKind` plus one entry
in ``KINDS``."""

from __future__ import annotations

from moesim.config.scenario import Scenario
from moesim.workloads.base import Simulated, WorkloadKind
from moesim.workloads.layer import LayerKind
from moesim.workloads.serving import ServingKind
from moesim.workloads.training import TrainingKind

KINDS: dict[str, WorkloadKind] = {k.name: k for k in (LayerKind(), ServingKind(), TrainingKind())}


def kind_of(scenario: Scenario) -> WorkloadKind:
    """The kind that runs a scenario's workload."""
    return KINDS[scenario.workload.kind]


__all__ = ["KINDS", "Simulated", "WorkloadKind", "kind_of"]
