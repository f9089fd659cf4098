"""The Python API behind the CLI: run a scenario, get a Result, optionally write its folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from moesim import __version__
from moesim.config.scenario import Scenario
from moesim.cost.layer_cost import MoELayerCost
from moesim.errors import OutputError
from moesim.report.files import (
    file_in_the_way,
    json_safe,
    write_json_atomic,
    write_text_atomic,
)
from moesim.system import System, build_system
from moesim.workloads import Simulated, kind_of


@dataclass(frozen=True)
class Result:
    """A finished run: the scenario, its summary (the JSON of ``moesim run --json``) and the
    engine's records."""

    scenario: Scenario
    summary: dict[str, Any]
    simulated: Simulated
    system: System
    wall_s: float

    @property
    def records(self) -> Any:
        """The engine's records (layer, serving or training step)."""
        return self.simulated.records

    @property
    def training_run(self) -> Any:
        """The training run over ``workload.duration_s`` (failures, checkpoints,
        restarts), or None."""
        return self.simulated.run

    def write(self, out_dir: str | Path | None = None, report: bool = False) -> Path:
        """Write the run folder ``<out>/<name>/<run-id>/`` and return its path.

        Holds ``scenario.yaml`` (fully resolved: rerunning it reproduces the summary),
        ``summary.json``, ``run.json`` (version, wall time, timestamp), when
        ``output.trace`` is on the workload's traces (``trace.json``), and with ``report``
        ``report.md`` and its plots. The folder is written under a hidden temporary name
        and renamed when complete, so an interrupted write leaves no partial run folder.
        ``OutputError`` when ``<out>`` (or a folder on its way) is a file.
        """
        base = Path(out_dir if out_dir is not None else self.scenario.output.dir)
        check_output_dir(base, "--out" if out_dir is not None else "output.dir")
        resolved = self.scenario.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        parent = base / self.scenario.name
        run_dir = parent / f"{stamp}-{digest}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = parent / f"{stamp}-{digest}-{n}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{run_dir.name}.", suffix=".tmp"))
            mask = os.umask(0o022)
            os.umask(mask)
            tmp.chmod(0o777 & ~mask)  # as mkdir would make it (mkdtemp makes 0700)
        except OSError as exc:
            why = exc.strerror or "error"
            raise OutputError(f"cannot create a run folder in {str(parent)!r}: {why}") from None
        try:
            self._fill(tmp, resolved, stamp, digest, report)
            os.replace(tmp, run_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return run_dir

    def _fill(
        self, run_dir: Path, resolved: dict[str, Any], stamp: str, digest: str, report: bool
    ) -> None:
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
            for name, trace in kind_of(self.scenario).traces(self.system, self.simulated).items():
                write_json_atomic(run_dir / name, trace)
        if report:
            self.write_report(run_dir)

    def table(self) -> str:
        """The text table ``moesim run`` prints for this workload."""
        return kind_of(self.scenario).table(self.summary)

    def write_report(self, run_dir: Path) -> Path:
        """Write ``report.md`` with the workload's plots into a run folder."""
        from moesim.report.document import write_report

        kind = kind_of(self.scenario)
        return write_report(
            run_dir,
            self.scenario,
            self.summary,
            self.wall_s,
            lambda add: kind.plots(self.summary, self.simulated, add),
        )


def run(scenario: Scenario, moe_cost: MoELayerCost | None = None) -> Result:
    """Simulate a scenario (no files are written; see :meth:`Result.write`).

    ``moe_cost``: a run may reuse the memoized MoE layer costs of an earlier run whose
    cluster, model, layout, routing, policies and seed agree (a rate sweep), where its
    workload kind shares layer costs."""
    t0 = time.perf_counter()
    system = build_system(scenario)
    kind = kind_of(scenario)
    sim = kind.simulate(system, moe_cost if kind.shares_layer_cost() else None)
    summary = kind.summary(system, sim)
    summary["energy"] = kind.energy(system, sim)
    return Result(scenario, json_safe(summary), sim, system, time.perf_counter() - t0)


def check_output_dir(base: Path, named: str) -> None:
    """``OutputError`` unless run folders can be made under ``base`` (it, and every folder
    above it that exists, is a folder)."""
    p = file_in_the_way(base)
    if p is not None:
        raise OutputError(f"{named}: {str(p)!r} is a file, not a folder")
