"""Capacity search: the highest rate within the SLO, bracketed to the tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.cli import main
from moesim.errors import ScenarioError
from moesim.sweep.capacity import find_capacity

SCENARIO = """\
name: cap
seed: 4
cluster: {preset: dgx-h100, launch: graph}
model: {preset: mixtral-8x7b, layers: 4}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: null, overflow: dropless}
workload:
  kind: serving
  duration_s: 4
  warmup_s: 1
  arrival: {kind: poisson, rate_per_s: 50}
  prompt_tokens: {kind: constant, value: 512}
  output_tokens: {kind: constant, value: 32}
  scheduler: {max_batch_tokens: 4096, max_seqs: 64, chunked_prefill: true}
  slo: {ttft_ms: 60, tpot_ms: 8}
"""


def _file(tmp_path: Path, text: str = SCENARIO) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return f


def test_capacity_is_bracketed_and_feasibility_is_monotone(tmp_path: Path) -> None:
    r = find_capacity(_file(tmp_path), target=0.95, tolerance=0.1)
    assert r.best is not None and r.limit is not None
    assert r.best.feasible and not r.limit.feasible
    assert r.best.rate_per_s < r.limit.rate_per_s <= 1.1 * r.best.rate_per_s + 1e-9
    # every feasible probe is below every infeasible one (more load never helps)
    ok = [p.rate_per_s for p in r.probes if p.feasible]
    bad = [p.rate_per_s for p in r.probes if not p.feasible]
    assert max(ok) < min(bad)
    assert r.best.summary["slo_attainment"]["both"] >= 0.95


def test_a_looser_slo_never_lowers_capacity(tmp_path: Path) -> None:
    tight = find_capacity(_file(tmp_path), target=0.95, tolerance=0.1)
    loose = find_capacity(
        _file(tmp_path, SCENARIO.replace("tpot_ms: 8", "tpot_ms: 16")), target=0.95, tolerance=0.1
    )
    assert tight.best is not None and loose.best is not None
    assert loose.best.rate_per_s >= tight.best.rate_per_s * 0.9


def test_capacity_needs_a_serving_slo(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="needs SLO targets"):
        find_capacity(_file(tmp_path, SCENARIO.replace("  slo: {ttft_ms: 60, tpot_ms: 8}\n", "")))
    with pytest.raises(ScenarioError, match="serving workload"):
        find_capacity(Path(__file__).parent.parent / "scenarios" / "quickstart.yaml")


def test_capacity_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", str(_file(tmp_path)), "--target", "0.95", "--tolerance", "0.2"]) == 0
    assert "capacity:" in capsys.readouterr().out
    assert main(["capacity", str(_file(tmp_path)), "--target", "2"]) == 2


def test_more_seeds_never_raise_capacity(tmp_path: Path) -> None:
    """A rate must pass every seed: two seeds can only lower (or keep) the capacity."""
    one = find_capacity(_file(tmp_path), target=0.95, tolerance=0.1)
    two = find_capacity(_file(tmp_path), target=0.95, tolerance=0.1, seeds=2)
    assert one.best is not None and two.best is not None
    assert two.best.rate_per_s <= one.best.rate_per_s * 1.1
    for p in two.probes:  # the reported probe is the worst seed's
        if p.feasible:
            assert p.summary["throughput_tokens_per_s"] >= 0.95 * p.summary["offered_tokens_per_s"]
