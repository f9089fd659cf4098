"""Sweeps: points, resumption, executors, feasibility, Pareto fronts, located errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.config.sweep import Bound
from moesim.errors import ScenarioError
from moesim.sweep import load_sweep, run_sweep
from moesim.sweep.pareto import feasible, front, metric, pareto_mask
from moesim.sweep.points import expand

BASE = """\
name: tiny
seed: 3
cluster: dgx-h100
model: {preset: mixtral-8x7b, layers: 2}
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.0}
workload: {kind: layer, tokens: 512}
"""

SWEEP = """\
name: tiny-sweep
base: base.yaml
grid:
  routing.s: [0.0, 1.5]
  policies.capacity_factor: [1.0, 2.0, null]
metrics: [time_ms, dropped_fraction, fully_dropped_tokens]
constraints:
  dropped_fraction: {max: 0.2}
objectives:
  minimize: [time_ms, dropped_fraction]
"""


def _files(tmp_path: Path, sweep: str = SWEEP, base: str = BASE) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    f = tmp_path / "sweep.yaml"
    f.write_text(sweep)
    return f


def test_points_are_the_grid_product_crossed_with_zip(tmp_path: Path) -> None:
    f = _files(
        tmp_path,
        SWEEP + "zip:\n  seed: [1, 2]\n  workload.tokens: [256, 1024]\n",
    )
    cfg, _ = load_sweep(f)
    pts = expand(cfg)
    assert len(pts) == 2 * 3 * 2
    assert pts[0].values == {
        "routing.s": 0.0,
        "policies.capacity_factor": 1.0,
        "seed": 1,
        "workload.tokens": 256,
    }
    assert pts[1].values["seed"] == 2 and pts[1].values["workload.tokens"] == 1024
    assert len({json.dumps(p.values, sort_keys=True) for p in pts}) == len(pts)


def test_sweep_runs_resumes_and_reruns_what_changed(tmp_path: Path) -> None:
    f = _files(tmp_path)
    out = tmp_path / "out"
    r = run_sweep(f, out=out)
    assert (r.ran, r.reused) == (6, 0)
    rows = {json.dumps(p.values): row for p, row in zip(r.points, r.rows)}
    # dropless (null) never drops; skew drops more at the same capacity
    assert rows['{"routing.s": 1.5, "policies.capacity_factor": null}']["dropped_fraction"] == 0
    assert (
        rows['{"routing.s": 1.5, "policies.capacity_factor": 1.0}']["dropped_fraction"]
        > rows['{"routing.s": 0.0, "policies.capacity_factor": 1.0}']["dropped_fraction"]
    )
    assert len(list((r.folder / "points").glob("*.json"))) == 6
    csv_lines = (r.folder / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("point,routing.s")
    # a second run reuses every point, with identical results
    again = run_sweep(f, out=out)
    assert (again.ran, again.reused) == (0, 6) and again.rows == r.rows
    # an interrupted sweep: lose two points, only those rerun
    for i in (1, 4):
        (r.folder / "points" / f"{i:04d}.json").unlink()
    resumed = run_sweep(f, out=out)
    assert (resumed.ran, resumed.reused) == (2, 4) and resumed.rows == r.rows
    # editing the base scenario changes every point's digest: all rerun
    (tmp_path / "base.yaml").write_text(BASE.replace("tokens: 512", "tokens: 256"))
    changed = run_sweep(f, out=out)
    assert (changed.ran, changed.reused) == (6, 0)
    assert run_sweep(f, out=out, fresh=True).ran == 6


def test_feasibility_and_front_follow_their_definitions(tmp_path: Path) -> None:
    r = run_sweep(_files(tmp_path), out=tmp_path / "out")
    for row, ok in zip(r.rows, r.feasible):
        assert ok == (row["dropped_fraction"] is not None and row["dropped_fraction"] <= 0.2)
    assert r.pareto and all(r.feasible[i] for i in r.pareto)
    on = [(r.rows[i]["time_ms"], r.rows[i]["dropped_fraction"]) for i in r.pareto]
    for i, row in enumerate(r.rows):
        if not r.feasible[i] or i in r.pareto:
            continue
        t, d = row["time_ms"], row["dropped_fraction"]
        assert any(a <= t and b <= d and (a < t or b < d) for a, b in on)


def test_pareto_mask_closed_form() -> None:
    costs = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [2, 2], [4, 4]], dtype=float)
    assert pareto_mask(costs).tolist() == [True, True, False, True, True, False]
    rows = [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 3.0}, {"a": None, "b": 9.0}]
    # maximize b: point 1 (b=3) is not dominated by point 0 (smaller a, smaller b)
    assert front(rows, ["a"], ["b"], [0, 1, 2]) == [0, 1]
    assert front(rows, ["a"], [], [1]) == [1]


def test_metric_and_bounds() -> None:
    s = {"ttft_ms": {"p99": 12.5}, "drained": True, "name": "x"}
    assert metric(s, "ttft_ms.p99") == 12.5
    assert metric(s, "ttft_ms.p50") is None and metric(s, "drained") is None
    assert feasible({"x": 3.0}, {"x": Bound(max=3)}) and not feasible(
        {"x": 3.1}, {"x": Bound(max=3)}
    )
    assert not feasible({"x": None}, {"x": Bound(min=0)})


def test_process_pool_gives_the_same_results(tmp_path: Path) -> None:
    f = _files(tmp_path)
    serial = run_sweep(f, out=tmp_path / "a")
    pooled = run_sweep(f, workers=2, out=tmp_path / "b")
    assert pooled.rows == serial.rows and pooled.pareto == serial.pareto


def test_bad_point_is_located_at_the_sweep_key(tmp_path: Path) -> None:
    bad = SWEEP.replace("routing.s: [0.0, 1.5]", "routing.s: [0.0, -1]")
    with pytest.raises(ScenarioError) as exc:
        run_sweep(_files(tmp_path, bad), out=tmp_path / "out")
    text = exc.value.render()
    # one issue for the bad value, naming the three points it hits
    assert "sweep.yaml:4:3: 3 points: point 3, point 4, point 5" in text
    assert "routing.s: must be >= 0.0, got -1" in text and text.count("sweep.yaml:4:3") == 1
    assert not (tmp_path / "out").exists()  # nothing runs until every point is valid
    # a problem in the base scenario keeps its own location
    with pytest.raises(ScenarioError) as exc:
        run_sweep(_files(tmp_path, SWEEP, BASE.replace("tokens: 512", "tokens: 0")))
    assert "base.yaml:8" in exc.value.render()


def test_bad_sweep_file_errors_are_located(tmp_path: Path) -> None:
    bad = SWEEP.replace("metrics:", "metric:")
    with pytest.raises(ScenarioError) as exc:
        load_sweep(_files(tmp_path, bad))
    assert "did you mean 'metrics'" in exc.value.render()
    bad = SWEEP + "zip:\n  seed: [1, 2]\n  workload.tokens: [1]\n"
    with pytest.raises(ScenarioError, match="same length"):
        load_sweep(_files(tmp_path, bad))
    bad = SWEEP.replace("minimize: [time_ms, dropped_fraction]", "minimize: [energy.kwh]")
    with pytest.raises(ScenarioError, match=r"must list \['energy.kwh'\]"):
        load_sweep(_files(tmp_path, bad))
    with pytest.raises(ScenarioError, match="no such scenario file"):
        run_sweep(_files(tmp_path, SWEEP.replace("base.yaml", "nope.yaml")))


def test_ray_executor_is_optional(tmp_path: Path) -> None:
    f = _files(tmp_path, SWEEP + "executor: ray\n")
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(ScenarioError, match=r"pip install 'moesim\[ray\]'"):
            run_sweep(f, out=tmp_path / "out")
    else:  # pragma: no cover - only where ray is installed
        r = run_sweep(f, out=tmp_path / "out")
        assert r.ran == 6


def test_sweep_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _files(tmp_path)
    assert main(["sweep", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (*)" in out and "feasible" in out
    assert (tmp_path / "out" / "sweeps" / "tiny-sweep" / "pareto.png").stat().st_size > 1000
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_sweeps_are_valid() -> None:
    from moesim.sweep.runner import plan

    files = sorted((Path(__file__).parent.parent / "scenarios" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        cfg, positions = load_sweep(f)
        points = plan(cfg, f.parent / cfg.base, positions, str(f))
        assert len(points) == len(expand(cfg)) > 1


def test_metric_typo_fails_after_one_point_with_a_hint(tmp_path: Path) -> None:
    f = _files(tmp_path, SWEEP.replace("fully_dropped_tokens]", "fully_droped_tokens]"))
    with pytest.raises(ScenarioError) as exc:
        run_sweep(f, out=tmp_path / "out")
    text = exc.value.render()
    assert "metrics[2]" in text and "did you mean 'fully_dropped_tokens'" in text
    # the finished point is kept: fixing the typo resumes from it
    fixed = run_sweep(_files(tmp_path), out=tmp_path / "out")
    assert fixed.reused == 1 and fixed.ran == 5


def test_running_a_sweep_file_as_a_scenario_says_so(tmp_path: Path) -> None:
    from moesim.loader import load_scenario

    with pytest.raises(ScenarioError, match="moesim sweep"):
        load_scenario(_files(tmp_path))


@pytest.mark.parametrize(
    "short",
    [
        pytest.param(
            (
                "workload.duration_s=3",
                "workload.warmup_s=1",
                "model.layers=4",
                "workload.prompt_tokens={kind: constant, value: 256}",
                "workload.output_tokens={kind: constant, value: 16}",
            ),
            id="small",
        ),
        pytest.param(
            ("workload.duration_s=3", "workload.warmup_s=1"), id="full", marks=pytest.mark.slow
        ),
    ],
)
def test_serving_points_share_layer_costs_without_changing_results(
    tmp_path: Path, short: tuple[str, ...]
) -> None:
    """A rate sweep run in one process shares the MoE layer costs of points that differ
    only in their workload: the same summaries as running each point alone, even the
    count of layer-cost evaluations (so point files do not depend on --workers)."""
    from moesim.api import run
    from moesim.loader import load_scenario
    from moesim.sweep.runner import _run_point

    base = Path(__file__).parent.parent / "scenarios" / "mixtral-serving-dgx-h100.yaml"
    costs: dict[str, object] = {}
    shared = [
        _run_point(str(base), (*short, f"workload.arrival.rate_per_s={r}"), costs)[0]
        for r in (10, 40)
    ]
    assert len(costs) == 1  # one layer cost served both rates
    for r, outcome in zip((10, 40), shared):
        alone = run(load_scenario(base, [*short, f"workload.arrival.rate_per_s={r}"])).summary
        assert outcome["status"] == "ok" and outcome["summary"] == alone
