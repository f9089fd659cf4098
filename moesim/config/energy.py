"""Facility-level energy inputs: power usage effectiveness and grid carbon intensity."""

from __future__ import annotations

from pydantic import Field

from moesim.config.base import Frozen


class EnergyConfig(Frozen):
    """Inputs of the energy and carbon report that sit outside the devices."""

    pue: float = Field(default=1.0, ge=1.0)
    """Power usage effectiveness of the facility (total power / IT power)."""
    carbon_intensity_g_per_kwh: float = Field(default=0.0, ge=0)
    """Grid carbon intensity, gCO2e per kWh (0 = not set: carbon is not reported)."""
    source: str = ""
    """Where ``pue`` and ``carbon_intensity_g_per_kwh`` come from (shown in reports)."""
