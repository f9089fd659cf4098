"""Where and what a run writes."""

from __future__ import annotations

from pydantic import Field

from moesim.config.base import Frozen


class OutputConfig(Frozen):
    """The run folder and optional artefacts."""

    dir: str = Field(default="reports", min_length=1)
    """Parent folder of run folders (``<dir>/<name>/<run-id>/``), relative to the cwd."""
    trace: bool = False
    """Also write a Chrome/Perfetto trace (``trace.json``) of the simulated timeline."""
