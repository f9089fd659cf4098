"""The Python API behind the CLI: run a scenario, get a Result, optionally write its folder."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moesim import __version__
from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.cost.layer_cost import MoELayerCost
from moesim.engine.layer_sim import LayerRecords, simulate_layer
from moesim.engine.serving import ServingRecords, simulate_serving
from moesim.engine.training import TrainingRecords, simulate_training
from moesim.report.files import write_json_atomic, write_text_atomic
from moesim.report.summary import layer_summary
from moesim.system import System, build_system

if TYPE_CHECKING:
    from moesim.failures.training_run import TrainingRunRecords


@dataclass(frozen=True)
class Result:
    """A finished run: the scenario, its summary (the JSON of ``moesim run --json``) and the
    engine's records."""

    scenario: Scenario
    summary: dict[str, Any]
    records: LayerRecords | ServingRecords | TrainingRecords
    system: System
    wall_s: float
    training_run: TrainingRunRecords | None = None
    """The training run over ``workload.duration_s`` (failures, checkpoints, restarts)."""

    def write(self, out_dir: str | Path | None = None) -> Path:
        """Write the run folder ``<out>/<name>/<run-id>/`` and return its path.

        Holds ``scenario.yaml`` (fully resolved: rerunning it reproduces the summary),
        ``summary.json``, ``run.json`` (version, wall time, timestamp) and, when
        ``output.trace`` is on, ``trace.json``. Every file is written atomically.
        """
        base = Path(out_dir if out_dir is not None else self.scenario.output.dir)
        resolved = self.scenario.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        parent = base / self.scenario.name
        run_dir = parent / f"{stamp}-{digest}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = parent / f"{stamp}-{digest}-{n}"
        run_dir.mkdir(parents=True)
        write_text_atomic(run_dir / "scenario.yaml", yaml.safe_dump(resolved, sort_keys=False))
        write_json_atomic(run_dir / "summary.json", self.summary)
        write_json_atomic(
            run_dir / "run.json",
            {
                "moesim": __version__,
                "wall_s": round(self.wall_s, 4),
                "utc": stamp,
                "scenario_sha256_8": digest,
            },
        )
        if self.scenario.output.trace:
            self._write_failure_traces(run_dir)
        if self.scenario.output.trace and isinstance(self.records, LayerRecords):
            from moesim.report.trace import chrome_trace

            trace = chrome_trace(self.records.timeline.intervals, self.system.topology.devices)
            write_json_atomic(run_dir / "trace.json", trace)
        elif self.scenario.output.trace and isinstance(self.records, TrainingRecords):
            from moesim.report.trace import pipeline_trace

            r = self.records
            trace = pipeline_trace(r.ops, len(r.stages), r.grad_sync_s, r.optimizer_s, r.pipeline_s)
            name = "step_trace.json" if self.training_run is not None else "trace.json"
            write_json_atomic(run_dir / name, trace)
        return run_dir

    def _write_failure_traces(self, run_dir: Path) -> None:
        """``trace.json`` of a serving run with failures, or of a training run (its
        train / checkpoint / down / restart spans and failure events)."""
        from moesim.report.failures import serving_failure_trace, training_failure_trace

        devices = self.system.topology.devices
        if isinstance(self.records, ServingRecords) and self.records.failures is not None:
            it = self.records.iterations
            trace = serving_failure_trace(self.records.failures, it.start_s, it.duration_s, devices)
            write_json_atomic(run_dir / "trace.json", trace)
        elif self.training_run is not None:
            write_json_atomic(
                run_dir / "trace.json", training_failure_trace(self.training_run, devices)
            )


def run(scenario: Scenario, moe_cost: MoELayerCost | None = None) -> Result:
    """Simulate a scenario (no files are written; see :meth:`Result.write`).

    ``moe_cost``: a serving run may reuse the memoized MoE layer costs of an earlier run
    whose cluster, model, layout, routing, policies and seed agree (a rate sweep)."""
    t0 = time.perf_counter()
    system = build_system(scenario)
    records: LayerRecords | ServingRecords | TrainingRecords
    training_run = None
    if isinstance(scenario.workload, ServingWorkload):
        from moesim.report.serving import serving_summary

        records = simulate_serving(system, moe_cost)
        summary = serving_summary(system, records)
        if records.failures is not None:
            from moesim.report.failures import serving_failures_summary

            summary["failures"] = serving_failures_summary(system, records)
    elif isinstance(scenario.workload, TrainingWorkload):
        from moesim.report.training import training_summary

        records = simulate_training(system, scenario.workload)
        summary = training_summary(system, scenario.workload, records)
        if scenario.workload.duration_s is not None:
            from moesim.failures.training_run import simulate_training_run
            from moesim.report.failures import training_failures_summary

            training_run = simulate_training_run(system, scenario.workload, records)
            summary["failures"] = training_failures_summary(system, scenario.workload, training_run)
    else:
        records = simulate_layer(system)
        summary = layer_summary(system, records)
    from moesim.energy.summary import energy_summary

    summary["energy"] = energy_summary(system, records, training_run)
    return Result(scenario, summary, records, system, time.perf_counter() - t0, training_run)
