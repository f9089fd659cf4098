"""Redundant experts with padded expert compute are refused with a located error (they
crashed at run time: the padded layout counts logical experts, the replicas add slots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.errors import ScenarioError
from moesim.loader import load_scenario

SCENARIO = """\
name: rp
seed: 1
cluster: {preset: dgx-h100, nodes: 1}
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop, expert_compute: padded, experts: {redundant: 8}}
workload: {kind: layer, tokens: 4096}
"""


def test_redundant_and_padded_experts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO)
    with pytest.raises(ScenarioError, match="padded expert compute") as err:
        load_scenario(path)
    assert "s.yaml:7" in str(err.value)
    load_scenario(path, ["policies.expert_compute=grouped"])  # grouped is fine


def test_balancer_statistics_are_bounded(tmp_path: Path) -> None:
    """statistics_tokens x experts x MoE layers is a resource bound (a 5M-token sample of
    Mixtral took 72 s and 0.9 GB), checked at load with a located error."""
    path = tmp_path / "s.yaml"
    path.write_text(
        SCENARIO.replace("expert_compute: padded, ", "").replace(
            "redundant: 8}", "redundant: 8, statistics_tokens: 5000000}"
        )
    )
    with pytest.raises(ScenarioError, match="statistics_tokens x experts x MoE layers"):
        load_scenario(path)
    load_scenario(path, ["policies.experts.statistics_tokens=100000"])
