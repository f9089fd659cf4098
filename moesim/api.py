"""The Python API behind the CLI: run a scenario, get a Result, optionally write its folder."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from moesim import __version__
from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.engine.layer_workload import LayerRecords, simulate_layer
from moesim.engine.serving import ServingRecords, simulate_serving
from moesim.engine.training import TrainingRecords, simulate_training
from moesim.report.files import write_json_atomic, write_text_atomic
from moesim.report.summary import layer_summary
from moesim.system import System, build_system


@dataclass(frozen=True)
class Result:
    """A finished run: the scenario, its summary (the JSON of ``moesim run --json``) and the
    engine's records."""

    scenario: Scenario
    summary: dict[str, Any]
    records: LayerRecords | ServingRecords | TrainingRecords
    system: System
    wall_s: float

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
        if self.scenario.output.trace and isinstance(self.records, LayerRecords):
            from moesim.report.trace import chrome_trace

            trace = chrome_trace(self.records.timeline.intervals, self.system.topology.devices)
            write_json_atomic(run_dir / "trace.json", trace)
        elif self.scenario.output.trace and isinstance(self.records, TrainingRecords):
            from moesim.report.trace import pipeline_trace

            r = self.records
            trace = pipeline_trace(r.ops, len(r.stages), r.grad_sync_s, r.optimizer_s, r.pipeline_s)
            write_json_atomic(run_dir / "trace.json", trace)
        return run_dir


def run(scenario: Scenario) -> Result:
    """Simulate a scenario (no files are written; see :meth:`Result.write`)."""
    t0 = time.perf_counter()
    system = build_system(scenario)
    records: LayerRecords | ServingRecords | TrainingRecords
    if isinstance(scenario.workload, ServingWorkload):
        from moesim.report.serving import serving_summary

        records = simulate_serving(system)
        summary = serving_summary(system, records)
    elif isinstance(scenario.workload, TrainingWorkload):
        from moesim.report.training import training_summary

        records = simulate_training(system, scenario.workload)
        summary = training_summary(system, scenario.workload, records)
    else:
        records = simulate_layer(system)
        summary = layer_summary(system, records)
    from moesim.energy.summary import energy_summary

    summary["energy"] = energy_summary(system, records)
    return Result(scenario, summary, records, system, time.perf_counter() - t0)
