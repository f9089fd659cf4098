"""Every example scenario validates and runs (at a reduced size, to keep CI quick)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moesim

SCENARIOS = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.yaml"))


def test_there_are_examples() -> None:
    """The repository ships example scenarios, the quickstart among them."""
    assert "quickstart.yaml" in {p.name for p in SCENARIOS}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_example_runs(path: Path) -> None:
    """The example loads, runs, and conserves its token-choice slots."""
    s = moesim.load_scenario(str(path), ["workload.tokens=2048"])
    summary = moesim.run(s).summary
    assert summary["time_ms"] > 0
    assert summary["processed_slots"] + summary["dropped_tokens"] == 2048 * s.model.top_k
    assert sum(summary["breakdown_ms"].values()) == pytest.approx(summary["time_ms"], abs=1e-5)
