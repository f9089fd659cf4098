"""The built-in preset catalog: data files of hardware, links, clusters and models.

Each data file is a YAML mapping from preset name to that preset's fields. Every preset
carries a ``source:`` naming the datasheet, paper, model card or measurement file its
values come from. This module only reads the files; typing and validation belong to
``moesim.config`` and merging with user overrides to ``moesim.loader``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

Kind = Literal["accelerators", "links", "switches", "clusters", "models", "engines"]
KINDS: tuple[Kind, ...] = ("accelerators", "links", "switches", "clusters", "models", "engines")


def data_path(kind: Kind) -> str:
    """The on-disk path of one catalog data file (for error messages and sources)."""
    return str(resources.files("moesim.catalog") / "data" / f"{kind}.yaml")


@cache
def _raw(kind: Kind) -> dict[str, dict[str, Any]]:
    text = (resources.files("moesim.catalog") / "data" / f"{kind}.yaml").read_text("utf-8")
    # shipped data: libyaml's parser where PyYAML has it (same data, ~10x faster)
    loaded = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{data_path(kind)}: expected a mapping of preset names")
    return loaded


def names(kind: Kind) -> list[str]:
    """The preset names of one kind, in file order."""
    return list(_raw(kind))


def raw_preset(kind: Kind, name: str) -> dict[str, Any]:
    """A preset's fields as written in the data file, with ``name`` filled from its key."""
    table = _raw(kind)
    if name not in table:
        raise KeyError(name)
    return {"name": name, **table[name]}


def profile_names() -> list[str]:
    """Names of the measured device profiles shipped with the catalog."""
    folder = resources.files("moesim.catalog") / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def profile_path(name: str) -> str:
    """The on-disk path of a shipped profile."""
    return str(resources.files("moesim.catalog") / "profiles" / f"{name}.yaml")
