"""Typed access to the hardware presets: accelerators, links and switches.

Each function reads one preset from the catalog data files, validates it against its
schema in ``moesim.config.hardware`` and caches the result. A run does not look links and
switches up here: the loader copies the presets a cluster names into the scenario
(``cluster.links`` / ``cluster.switches``, overridable), and the topology and the energy
account read them from there.
"""

from __future__ import annotations

from functools import cache

import yaml

from moesim.catalog import Kind, data_path, names, profile_names, profile_path, raw_preset
from moesim.config.hardware import AcceleratorSpec, LinkSpec, SwitchSpec
from moesim.config.profile import DeviceProfile


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
    """The accelerator preset ``name``; KeyError listing valid names if there is none.

    A preset's ``profile`` names a shipped measured profile; it is read and embedded.
    """
    raw = dict(_lookup("accelerators", name))
    if isinstance(raw.get("profile"), str):
        raw["profile"] = profile(str(raw["profile"]))
    return AcceleratorSpec.model_validate(raw)


@cache
def profile(name: str) -> DeviceProfile:
    """The shipped measured profile ``name`` (``moesim/catalog/profiles/NAME.yaml``)."""
    if name not in profile_names():
        raise KeyError(f"no shipped profile {name!r}; shipped: {', '.join(profile_names())}")
    with open(profile_path(name), encoding="utf-8") as f:
        return DeviceProfile.model_validate(yaml.safe_load(f))


@cache
def link(name: str) -> LinkSpec:
    """The link preset ``name``; KeyError listing valid names if there is none."""
    return LinkSpec.model_validate(_lookup("links", name))


@cache
def switch(name: str) -> SwitchSpec:
    """The switch preset ``name``; KeyError listing valid names if there is none."""
    return SwitchSpec.model_validate(_lookup("switches", name))
