"""Typed access to the hardware presets: accelerators, links and switches.

Each function reads one preset from the catalog data files, validates it against its
schema in ``moesim.config.hardware`` and caches the result.
"""

from __future__ import annotations

from functools import cache

from moesim.catalog import Kind, data_path, names, raw_preset
from moesim.config.hardware import AcceleratorSpec, LinkSpec, SwitchSpec


def _lookup(kind: Kind, name: str) -> dict[str, object]:
    try:
        return raw_preset(kind, name)
    except KeyError:
        valid = ", ".join(names(kind))
        raise KeyError(
            f"no {kind} preset named {name!r} in {data_path(kind)}; valid names: {valid}"
        ) from None


@cache
def accelerator(name: str) -> AcceleratorSpec:
    """The accelerator preset ``name``; KeyError listing valid names if there is none."""
    return AcceleratorSpec.model_validate(_lookup("accelerators", name))


@cache
def link(name: str) -> LinkSpec:
    """The link preset ``name``; KeyError listing valid names if there is none."""
    return LinkSpec.model_validate(_lookup("links", name))


@cache
def switch(name: str) -> SwitchSpec:
    """The switch preset ``name``; KeyError listing valid names if there is none."""
    return SwitchSpec.model_validate(_lookup("switches", name))
