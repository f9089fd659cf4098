"""From files to a validated Scenario: read, include, override, expand presets, validate."""

from __future__ import annotations

from pathlib import Path

from moesim.config.scenario import Scenario
from moesim.loader.resolve import apply_overrides, expand_presets, read_file
from moesim.loader.validate import validate


def load_scenario(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), seed: int | None = None
) -> Scenario:
    """Load, merge and validate a scenario file; raises ScenarioError with located issues."""
    data, positions = read_file(path)
    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"seed={seed}")
    apply_overrides(data, positions, overrides)
    expand_presets(data, positions)
    return validate(data, positions, str(path))


__all__ = ["load_scenario"]
