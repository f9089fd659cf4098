"""From files to a validated Scenario: read, include, override, expand presets, validate, run the
cross-field rules. Uses workloads (their rules), derived, catalog, config, errors."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moesim.config.scenario import Scenario
from moesim.errors import Issue, Location, ScenarioError
from moesim.loader.attachments import expand_hf_models, expand_profiles, expand_traces
from moesim.loader.files import PathPolicy
from moesim.loader.presets import expand_presets
from moesim.loader.resolve import apply_overrides, read_file
from moesim.loader.validate import validate


def load_scenario(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    allow_paths: Sequence[str | Path] = (),
    limits: bool = True,
) -> Scenario:
    """Load, merge and validate a scenario file; raises ScenarioError with located issues.

    Files it names (includes, profile, trace, ``hf_config``) must lie in its folder (or,
    for paths given by ``--set``, the working directory) or in one of ``allow_paths``;
    ``limits=False`` lifts the resource bounds of :mod:`moesim.loader.limits`."""
    policy = PathPolicy.for_scenario(path, allow_paths)
    data, positions = read_file(path, policy=policy)
    if "base" in data and ("grid" in data or "metrics" in data) and "workload" not in data:
        raise ScenarioError(
            [
                Issue(
                    positions.get(("base",), Location(str(path))),
                    "",
                    "this is a sweep file (base, grid, metrics): run it with `moesim sweep`",
                )
            ]
        )
    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"seed={seed}")
    apply_overrides(data, positions, overrides)
    expand_hf_models(data, positions, str(path), policy)
    expand_presets(data, positions)
    expand_profiles(data, positions, str(path), policy)
    expand_traces(data, positions, str(path), policy)
    return validate(data, positions, str(path), limits)


def scenario_from_dict(data: dict[str, Any], label: str = "<scenario>") -> Scenario:
    """Validate a scenario given as plain data (presets, profile and trace paths are
    expanded; relative paths are taken from the current directory)."""
    data = copy.deepcopy(data)
    positions: dict[Any, Any] = {}
    expand_hf_models(data, positions, str(Path.cwd() / label))
    expand_presets(data, positions)
    expand_profiles(data, positions, str(Path.cwd() / label))
    expand_traces(data, positions, str(Path.cwd() / label))
    return validate(data, positions, label)


__all__ = ["load_scenario", "scenario_from_dict"]
