"""Deep merge of scenario data with positions: mappings merge, everything else replaces, and a
preset named by a string that a mapping refines becomes ``{preset: NAME}`` first."""

from __future__ import annotations

import copy
from typing import Any

from moesim import catalog
from moesim.loader.yamlpos import Path, Positions

#: Paths whose value may be a preset name or ``{preset: NAME, ...overrides}``, in the order
#: they are expanded (a cluster preset names its accelerator).
PRESET_PATHS: tuple[tuple[Path, catalog.Kind], ...] = (
    (("cluster",), "clusters"),
    (("cluster", "accelerator"), "accelerators"),
    (("model",), "models"),
    (("workload", "engine"), "engines"),
)

#: The cluster's tables of the specs of the links and switches its fields name; each entry
#: is expanded as a preset of that kind (by default the preset of the entry's own name).
SPEC_TABLES: tuple[tuple[str, catalog.Kind], ...] = (("links", "links"), ("switches", "switches"))


def is_preset_path(path: Path) -> bool:
    """Whether the value at ``path`` may name a preset (a string that a mapping refines
    becomes ``{preset: NAME}``): the PRESET_PATHS and the entries of the spec tables."""
    if any(path == p for p, _ in PRESET_PATHS):
        return True
    return len(path) == 3 and path[0] == "cluster" and any(path[1] == t for t, _ in SPEC_TABLES)


def merge(
    base: dict[str, Any],
    base_pos: Positions,
    over: dict[str, Any],
    over_pos: Positions,
    at: Path,
    root: Path = (),
) -> None:
    """Deep-merge ``over`` into ``base`` (mappings merge, everything else replaces).

    A preset named by a string in ``base`` (``model: mixtral-8x7b``) that ``over`` refines
    with a mapping without its own ``preset`` becomes ``{preset: name}`` first, so the
    mapping overrides the preset's fields instead of replacing the preset.
    """
    for key, value in over.items():
        here = (*at, key)
        if (
            isinstance(value, dict)
            and "preset" not in value
            and isinstance(base.get(key), str)
            and is_preset_path((*root, *here))
        ):
            base[key] = {"preset": base[key]}
            if here in base_pos:
                base_pos[(*here, "preset")] = base_pos[here]
        if isinstance(value, dict) and isinstance(base.get(key), dict) and "preset" not in value:
            merge(base[key], base_pos, value, over_pos, here, root)
            if here in over_pos:
                base_pos[here] = over_pos[here]
            continue
        base[key] = copy.deepcopy(value)
        for p in [p for p in base_pos if p[: len(here)] == here]:
            del base_pos[p]
        for p, loc in over_pos.items():
            if p[: len(here)] == here:
                base_pos[p] = loc
