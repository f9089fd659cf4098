"""moesim: a discrete-event simulator of Mixture-of-Experts systems.

The Python API mirrors the command line::

    import moesim
    scenario = moesim.load_scenario("scenarios/quickstart.yaml", ["routing.s=1.5"])
    result = moesim.run(scenario)
    result.summary  # the same JSON as ``moesim run --json``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moesim.api import Result
    from moesim.config.scenario import Scenario


def load_scenario(
    path: str, overrides: list[str] | tuple[str, ...] = (), seed: int | None = None
) -> Scenario:
    """Load and validate a scenario file (``overrides`` are ``field.path=value`` strings)."""
    from moesim.loader import load_scenario as _load

    return _load(path, overrides, seed)


def run(scenario: Scenario, **kwargs: Any) -> Result:
    """Simulate a validated scenario and return its result."""
    from moesim.api import run as _run

    return _run(scenario, **kwargs)


__all__ = ["__version__", "load_scenario", "run"]
