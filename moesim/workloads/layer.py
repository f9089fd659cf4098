"""The ``layer`` workload kind: one MoE layer forward pass over T tokens, simulated once
(teaching and calibration)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.config.scenario import Scenario
from moesim.config.workload import LayerWorkload
from moesim.workloads.base import AddPlot, Rule, Simulated
from moesim.workloads.offload_rules import not_offloaded

if TYPE_CHECKING:
    from moesim.cost.layer_cost import MoELayerCost
    from moesim.system import System


def _tokens(scenario: Scenario) -> int:
    w = scenario.workload
    assert isinstance(w, LayerWorkload)  # the registry picked this kind by its type
    return w.tokens


class LayerKind:
    """One MoE layer on stage 0's devices."""

    name = "layer"

    def rules(self, scenario: Scenario) -> Rule:
        """One layer models neither offloading nor failures."""
        yield from not_offloaded(scenario, self.name)
        if scenario.failures is not None:
            yield "failures", "failures apply to serving and training workloads, not 'layer'"

    def simulate(self, system: System, moe_cost: MoELayerCost | None) -> Simulated:
        from moesim.engine.layer_sim import simulate_layer

        rec = simulate_layer(system)
        return Simulated(rec, routed=rec.routed)

    def shares_layer_cost(self) -> bool:
        return False

    def summary(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.report.summary import layer_summary

        summary = layer_summary(system, sim.records)
        if sim.routed is not None:
            summary["routing"] = sim.routed.summary()
        return summary

    def energy(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.energy.summary import layer_energy

        return layer_energy(system, sim.records, _tokens(system.scenario))

    def traces(self, system: System, sim: Simulated) -> dict[str, dict[str, Any]]:
        from moesim.engine.layer_sim import LayerRecords
        from moesim.report.trace import chrome_trace

        rec: LayerRecords = sim.records
        return {"trace.json": chrome_trace(rec.timeline.intervals, system.topology.devices)}

    def table(self, summary: dict[str, Any]) -> str:
        from moesim.report.table import layer_table

        return layer_table(summary)

    def plots(self, summary: dict[str, Any], sim: Simulated, add: AddPlot) -> None:
        from moesim.report.plots import layer_plots

        layer_plots(summary, add)
