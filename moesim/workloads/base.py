"""What a workload kind provides: the contract every kind (layer, serving, training)
implements, so the API, the loader, reports and sweeps never branch on the kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from moesim.config.scenario import Scenario
from moesim.report.document import AddPlot

if TYPE_CHECKING:
    from moesim.cost.layer_cost import MoELayerCost
    from moesim.system import System

Rule = Iterator[tuple[str, str]]
"""Cross-field problems as ``(field path, message)``; the loader locates them."""


@dataclass(frozen=True)
class Simulated:
    """What one run of a workload produced: the engine's records and, for training runs
    over a duration, the run around the simulated step."""

    records: Any
    run: Any = None
    routed: Any = None
    """What a trace or logits routing handed out (``moesim.routing.replay.RoutingUse``)."""


class WorkloadKind(Protocol):
    """One workload kind: its rules, its simulation, and how its records are reported."""

    name: str
    """The ``workload.kind`` value it handles."""

    def rules(self, scenario: Scenario) -> Rule:
        """Cross-field problems specific to this kind (sizes that must fit, shapes it
        cannot run)."""
        ...

    def simulate(self, system: System, moe_cost: MoELayerCost | None) -> Simulated:
        """Run the workload on a system; ``moe_cost`` is a memoized MoE layer cost shared
        with earlier runs where the kind can share it (see ``shares_layer_cost``)."""
        ...

    def shares_layer_cost(self) -> bool:
        """Whether runs that differ only in their workload may share one MoE layer cost."""
        ...

    def summary(self, system: System, sim: Simulated) -> dict[str, Any]:
        """The summary (``summary.json``) without the energy section."""
        ...

    def energy(self, system: System, sim: Simulated) -> dict[str, Any]:
        """The ``energy`` section."""
        ...

    def traces(self, system: System, sim: Simulated) -> dict[str, dict[str, Any]]:
        """Trace files (name -> Chrome/Perfetto JSON) for ``output.trace``."""
        ...

    def table(self, summary: dict[str, Any]) -> str:
        """The text table ``moesim run`` prints."""
        ...

    def plots(self, summary: dict[str, Any], sim: Simulated, add: AddPlot) -> None:
        """The kind's plots for ``report.md``."""
        ...
