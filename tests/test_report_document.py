"""report.md: every workload gets its tables, plots and the inputs' sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim.api import run
from moesim.cli import main
from moesim.loader import load_scenario

SCENARIOS = Path(__file__).parent.parent / "scenarios"
#: serving reports are about their sections, not the load: four layers, short requests
SMALL_REQUESTS = [
    "model.layers=4",
    "workload.prompt_tokens={kind: constant, value: 256}",
    "workload.output_tokens={kind: constant, value: 16}",
]


#: one run of each workload (and of serving with a failure), with the plots it must have
REPORT_CASES = [
    ("quickstart.yaml", ["workload.tokens=2048"], {"expert_load.png", "device_time.png"}),
    (
        "mixtral-serving-dgx-h100.yaml",
        ["workload.duration_s=3", "workload.warmup_s=1", *SMALL_REQUESTS],
        {"batches.png", "ttft_cdf.png"},
    ),
    ("switch-base-training-tpu-v3.yaml", [], {"breakdown.png"}),
    (
        "mixtral-serving-failure-dgx-h100.yaml",
        [
            "workload.duration_s=4",
            "workload.warmup_s=0.5",
            "failures.devices=[{kind: scheduled, device: 3, at_s: 1}]",
            "failures.links=[]",
            "failures.stragglers=[]",
            *SMALL_REQUESTS,
        ],
        {"batches.png", "ttft_cdf.png", "ttft_over_time.png"},
    ),
]


@pytest.mark.parametrize(("file", "overrides", "plots"), REPORT_CASES)
def test_report_has_figures_plots_and_sources(
    tmp_path: Path, file: str, overrides: list[str], plots: set[str]
) -> None:
    result = run(load_scenario(SCENARIOS / file, overrides))
    path = result.write_report(tmp_path)
    text = path.read_text()
    assert text.startswith(f"# {result.scenario.name}")
    assert plots <= {p.name for p in (tmp_path / "plots").glob("*.png")}
    for name in plots:
        assert f"](plots/{name})" in text
    # every scalar of the summary is in the table, with its value
    summary = result.summary
    key = {"layer": "time_ms", "serving": "throughput_tokens_per_s", "training": "step_time_ms"}[
        summary["workload"]
    ]
    assert f"| `{key}` |" in text
    assert result.scenario.model.source in text and result.scenario.cluster.source in text
    assert "## Energy" in text


def test_run_report_flag(tmp_path: Path) -> None:
    assert (
        main(["run", str(SCENARIOS / "quickstart.yaml"), "--out", str(tmp_path), "--report"]) == 0
    )
    (run_dir,) = list((tmp_path / "quickstart").iterdir())
    text = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"| `dropped_tokens` | {summary['dropped_tokens']} |" in text


def test_summary_fields_and_numbers() -> None:
    from moesim.report.fields import number, scalars

    s = {"a": 1, "b": {"c": 2.5, "d": [1, 2]}, "energy": {"j": 3.0}, "n": None}
    assert list(scalars(s, skip=("energy",))) == [("a", 1), ("b.c", 2.5), ("n", None)]
    assert dict(scalars(s))["energy.j"] == 3.0
    assert number(0.000123) == "1.230e-04" and number(12.3456) == "12.35"
    assert number(7) == "7" and number(None) == "-" and number(True) == "True"


def test_serving_run_writes_per_request_records_readable_per_umask(tmp_path: Path) -> None:
    """A serving run folder holds requests.csv, one row per request, whose measured rows
    give the summary's TTFT p99; every file is written with the mode open() would give
    under the umask (0644 under 022), not mkstemp's 0600."""
    import csv
    import os

    import numpy as np

    old = os.umask(0o022)
    try:
        args = ["run", str(SCENARIOS / "mixtral-serving-dgx-h100.yaml"), "--out", str(tmp_path)]
        for o in ["workload.duration_s=3", "workload.warmup_s=1", *SMALL_REQUESTS]:
            args += ["--set", o]
        assert main(args) == 0
    finally:
        os.umask(old)
    (run_dir,) = list((tmp_path / "mixtral-serving-dgx-h100").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = list(csv.DictReader((run_dir / "requests.csv").open()))
    assert len(rows) == summary["arrived_requests"]
    ttft = [float(r["ttft_ms"]) for r in rows if r["measured"] == "True" and r["ttft_ms"]]
    assert np.percentile(ttft, 99) == pytest.approx(summary["ttft_ms"]["p99"], rel=1e-6)
    for f in ("summary.json", "requests.csv", "scenario.yaml"):
        assert (run_dir / f).stat().st_mode & 0o777 == 0o644, f


def test_request_records_as_parquet(tmp_path: Path) -> None:
    """With pyarrow installed the same per-request table is written as Parquet too."""
    pq = pytest.importorskip("pyarrow.parquet")
    from moesim.report.records import request_columns, write_request_records

    overrides = ["workload.duration_s=2", "workload.warmup_s=0.5", *SMALL_REQUESTS]
    result = run(load_scenario(SCENARIOS / "mixtral-serving-dgx-h100.yaml", overrides))
    paths = write_request_records(tmp_path, result.records, 0.5)
    assert [p.name for p in paths] == ["requests.csv", "requests.parquet"]
    table = pq.read_table(tmp_path / "requests.parquet")
    cols = request_columns(result.records, 0.5)
    assert table.column_names == list(cols)
    assert table.num_rows == len(cols["request"]) == result.summary["arrived_requests"]
