"""Shared fixtures (a temporary scenario writer, the repository's paths) and the Hypothesis
profile: no test may depend on wall-clock speed, so no per-example deadline and no
too-slow health check (a loaded CI host would fail them for nothing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "moesim",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("moesim")

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a YAML file into a temporary folder and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


PAIR = """\
name: pair
seed: 3
cluster: h200x2
model: mixtral-8x7b
routing: {kind: uniform}
parallelism: {dp: 2, ep: 2}
policies: {capacity_factor: null, overflow: dropless}
workload: {kind: layer, tokens: 4096}
"""


@pytest.fixture(scope="session")
def write_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-GPU (h200x2) scenario file shared by property tests."""
    path = tmp_path_factory.mktemp("pair") / "pair.yaml"
    path.write_text(PAIR)
    return path
