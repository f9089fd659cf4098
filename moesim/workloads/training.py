"""The ``training`` workload kind: one simulated training step, scaled to ``steps``, or a
run over ``duration_s`` with checkpoints, failures and restarts around that step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.config.scenario import Scenario
from moesim.config.training import TrainingWorkload
from moesim.workloads.base import AddPlot, Rule, Simulated
from moesim.workloads.failure_rules import training_failures
from moesim.workloads.offload_rules import training_offload

if TYPE_CHECKING:
    from moesim.cost.layer_cost import MoELayerCost
    from moesim.system import System


def _workload(scenario: Scenario) -> TrainingWorkload:
    w = scenario.workload
    assert isinstance(w, TrainingWorkload)  # the registry picked this kind by its type
    return w


class TrainingKind:
    """DP/TP/PP/EP training steps (see moesim.engine.training)."""

    name = "training"

    def rules(self, scenario: Scenario) -> Rule:
        """Offloading (ZeRO-Offload, expert streaming) and checkpoint-restart failures."""
        w = _workload(scenario)
        yield from training_offload(scenario, w)
        yield from training_failures(scenario, w)

    def simulate(self, system: System, moe_cost: MoELayerCost | None) -> Simulated:
        from moesim.engine.training import simulate_training
        from moesim.failures.training_run import simulate_training_run

        w = _workload(system.scenario)
        records = simulate_training(system, w)
        run = simulate_training_run(system, w, records) if w.duration_s is not None else None
        # a trace or logits routing: every micro-batch of every step took the next tokens
        return Simulated(records, run, records.routed)

    def shares_layer_cost(self) -> bool:
        return False

    def summary(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.report.failures import training_failures_summary
        from moesim.report.training import training_summary

        w = _workload(system.scenario)
        summary = training_summary(system, w, sim.records)
        if sim.routed is not None:
            summary["routing"] = sim.routed.summary()
        if sim.run is not None:
            summary["failures"] = training_failures_summary(system, w, sim.run)
        return summary

    def energy(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.energy.summary import training_energy

        return training_energy(system, _workload(system.scenario), sim.records, sim.run)

    def traces(self, system: System, sim: Simulated) -> dict[str, dict[str, Any]]:
        from moesim.engine.training import TrainingRecords
        from moesim.report.failures import training_failure_trace
        from moesim.report.trace import pipeline_trace

        r: TrainingRecords = sim.records
        step = pipeline_trace(r.ops, len(r.stages), r.grad_sync_s, r.optimizer_s, r.pipeline_s)
        if sim.run is None:
            return {"trace.json": step}
        devices = system.topology.devices
        return {"step_trace.json": step, "trace.json": training_failure_trace(sim.run, devices)}

    def table(self, summary: dict[str, Any]) -> str:
        from moesim.report.training import training_table

        return training_table(summary)

    def plots(self, summary: dict[str, Any], sim: Simulated, add: AddPlot) -> None:
        from moesim.report.plots import training_plots

        training_plots(summary, add)
