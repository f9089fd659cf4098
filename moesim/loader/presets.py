"""Preset expansion: a field naming a catalog preset (cluster, accelerator, model, a shipped
device profile) becomes the preset's data with the user's overrides merged in, and the links
and switches a cluster names become its ``links`` and ``switches`` spec tables. Positions
follow the data: an error in preset data points into the catalog file, an override's into
the user's."""

from __future__ import annotations

import copy
import difflib
from functools import cache
from pathlib import Path as FsPath
from typing import Any

from moesim import catalog
from moesim.config.hardware import LinkSpec, SwitchSpec
from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader.merge import PRESET_PATHS, SPEC_TABLES, merge
from moesim.loader.yamlpos import Path, Positions, load_located


@cache
def _catalog_positions(kind: catalog.Kind) -> Positions:
    path = catalog.data_path(kind)
    text = FsPath(path).read_text("utf-8")
    _, positions = load_located(text, _short_catalog_path(kind), trusted=True)
    return positions


def _short_catalog_path(kind: catalog.Kind) -> str:
    return f"moesim/catalog/data/{kind}.yaml"


def expand_presets(data: dict[str, Any], positions: Positions) -> None:
    """Replace preset names (and ``{preset: NAME, ...}``) by the preset's fields, merged."""
    issues: list[Issue] = []
    workload = data.get("workload")
    if isinstance(workload, dict) and workload.get("kind") == "serving":
        workload.setdefault("engine", "ideal")
    for path, kind in PRESET_PATHS:
        parent: Any = data
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        value = parent[path[-1]]
        if isinstance(value, str):
            name, overrides = value, {}
        elif isinstance(value, dict) and "preset" in value:
            name = value["preset"]
            overrides = {k: v for k, v in value.items() if k != "preset"}
        else:
            continue
        loc = positions.get((*path, "preset"), positions.get(path, Location("")))
        if not isinstance(name, str) or name not in catalog.names(kind):
            issues.append(Issue(loc, dotted(path), _unknown_preset(kind, name)))
            continue
        over_pos = {p[len(path) :]: loc for p, loc in positions.items() if p[: len(path)] == path}
        expanded, expanded_pos = _with_preset(kind, name, overrides, over_pos, path)
        parent[path[-1]] = expanded
        _replace_positions(positions, path, expanded_pos)
    _apply_engine(data, positions)
    _expand_catalog_profile(data, positions, issues)
    _expand_specs(data, positions, issues)
    if issues:
        raise ScenarioError(issues)


def _from_catalog(section: dict[str, Any], positions: Positions, path: Path) -> bool:
    """Whether the value at ``path`` (a key of ``section``) is not written at all (a
    default) or came from a catalog preset, rather than from the user's files, ``--set`` or
    a scenario given as data (which has no positions)."""
    if path[-1] not in section:
        return True
    loc = positions.get(path)
    return loc is not None and loc.file.startswith("moesim/catalog/")


def _apply_engine(data: dict[str, Any], positions: Positions) -> None:
    """A serving engine's defaults: its scheduler fields under the scenario's own
    (``workload.scheduler``), and its launch mode and expert kernel where the scenario does
    not set them (a cluster preset's value is a default too, so the engine's wins)."""
    workload, cluster = data.get("workload"), data.get("cluster")
    if not isinstance(workload, dict) or not isinstance(workload.get("engine"), dict):
        return
    engine = workload["engine"]
    defaults = engine.get("scheduler")
    if isinstance(defaults, dict) and defaults:
        sched = workload.setdefault("scheduler", {})
        if isinstance(sched, dict):
            for key, value in defaults.items():
                if key not in sched:
                    sched[key] = copy.deepcopy(value)
                    at: Path = ("workload", "engine", "scheduler", key)
                    if at in positions:
                        positions[("workload", "scheduler", key)] = positions[at]
    if not isinstance(cluster, dict):
        return
    for key in ("launch", "expert_kernel"):
        value = engine.get(key)
        if value is not None and _from_catalog(cluster, positions, ("cluster", key)):
            cluster[key] = value
            src: Path = ("workload", "engine", key)
            if src in positions:
                positions[("cluster", key)] = positions[src]


def _with_preset(
    kind: catalog.Kind, name: str, overrides: dict[str, Any], over_pos: Positions, path: Path
) -> tuple[dict[str, Any], Positions]:
    """The preset ``name``'s fields with ``overrides`` merged in, and their positions (the
    preset's in the catalog file, the overrides' where they were written)."""
    preset = catalog.raw_preset(kind, name)
    cat_pos = _catalog_positions(kind)
    expanded: dict[str, Any] = {}
    expanded_pos: Positions = {}
    rel_cat = {p[1:]: loc for p, loc in cat_pos.items() if p and p[0] == name}
    rel_cat[("name",)] = cat_pos.get((name,), Location(_short_catalog_path(kind)))
    merge(expanded, expanded_pos, preset, rel_cat, ())
    merge(expanded, expanded_pos, overrides, over_pos, (), root=path)
    return expanded, expanded_pos


def _replace_positions(positions: Positions, path: Path, relative: Positions) -> None:
    """The positions below ``path`` become ``relative`` (keys relative to ``path``)."""
    for p in [p for p in positions if p[: len(path)] == path and len(p) > len(path)]:
        del positions[p]
    for p, loc in relative.items():
        if p:
            positions[(*path, *p)] = loc


def _named_specs(cluster: dict[str, Any]) -> dict[str, list[tuple[Path, str]]]:
    """(field path, name) of every link and switch the (expanded) cluster's fields name, by
    table; the same fields as the config's ``named_links`` / ``named_switches``."""
    links: list[tuple[Path, str]] = []
    switches: list[tuple[Path, str]] = []
    at: Path = ("cluster",)
    acc = cluster.get("accelerator")
    if isinstance(acc, dict):
        ports = acc.get("ports")
        for i, port in enumerate(ports if isinstance(ports, list) else []):
            if isinstance(port, dict) and isinstance(port.get("link"), str):
                links.append(((*at, "accelerator", "ports", i, "link"), port["link"]))
        if isinstance(acc.get("host_link"), str):
            links.append(((*at, "accelerator", "host_link"), acc["host_link"]))
    fabric = cluster.get("fabric")
    if isinstance(fabric, dict) and isinstance(fabric.get("nic"), str):
        links.append(((*at, "fabric", "nic"), fabric["nic"]))
    if isinstance(cluster.get("link"), str):
        links.append(((*at, "link"), cluster["link"]))
    scale_up = cluster.get("scale_up")
    if isinstance(scale_up, dict) and isinstance(scale_up.get("switch"), str):
        switches.append(((*at, "scale_up", "switch"), scale_up["switch"]))
    if isinstance(fabric, dict) and isinstance(fabric.get("switch"), str):
        switches.append(((*at, "fabric", "switch"), fabric["switch"]))
    return {"links": links, "switches": switches}


def _expand_specs(data: dict[str, Any], positions: Positions, issues: list[Issue]) -> None:
    """Fill ``cluster.links`` / ``cluster.switches`` with the spec of every link and switch
    the cluster names, each the catalog preset of its name merged with the entry the
    scenario gives (``nvlink4: {effective_bandwidth_gbps: 20}``); an entry may also name
    another preset (``{preset: NAME, ...}``, or just ``NAME``) or, under a name that is no
    preset, define the spec in full. Entries the cluster does not name are errors."""
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        return
    named = _named_specs(cluster)
    for field, kind in SPEC_TABLES:
        at: Path = ("cluster", field)
        what = _singular(kind)
        given = cluster.get(field)
        if given is None:
            given = {}
        if not isinstance(given, dict):
            issues.append(
                Issue(
                    _loc(positions, at),
                    dotted(at),
                    f"expected a mapping of {what} name -> spec, got {given!r}",
                )
            )
            continue
        first_ref: dict[str, Path] = {}
        for ref, name in named[field]:
            first_ref.setdefault(name, ref)
        for key in given:
            if key not in first_ref:
                names = ", ".join(first_ref) or "none"
                issues.append(
                    Issue(
                        _loc(positions, (*at, key)),
                        dotted((*at, key)),
                        f"the cluster names no {what} {key!r}, so this spec would go unused "
                        f"(it names: {names})",
                    )
                )
        table: dict[str, Any] = {}
        table_pos: Positions = {}
        for name, ref in first_ref.items():
            entry = _expand_spec(kind, name, given.get(name), ref, positions, issues)
            if entry is not None:
                table[name] = entry[0]
                table_pos.update({(name, *p): loc for p, loc in entry[1].items()})
        cluster[field] = table
        _replace_positions(positions, at, table_pos)


def _loc(positions: Positions, path: Path) -> Location:
    """The position of ``path`` or of its deepest located prefix."""
    for n in range(len(path), -1, -1):
        if path[:n] in positions:
            return positions[path[:n]]
    return Location("")


def _expand_spec(
    kind: catalog.Kind,
    name: str,
    value: Any,
    ref: Path,
    positions: Positions,
    issues: list[Issue],
) -> tuple[dict[str, Any], Positions] | None:
    """One table entry, expanded; None (and an issue) when it cannot be."""
    here: Path = ("cluster", kind, name)
    over_pos = {p[len(here) :]: loc for p, loc in positions.items() if p[: len(here)] == here}
    preset: Any
    overrides: dict[str, Any]
    if value is None:  # not given: the preset of that name
        if name not in catalog.names(kind):
            issues.append(Issue(_loc(positions, ref), dotted(ref), _unknown_preset(kind, name)))
            return None
        preset, overrides = name, {}
    elif isinstance(value, str):
        preset, overrides = value, {}
    elif isinstance(value, dict) and "preset" in value:
        preset = value["preset"]
        overrides = {k: v for k, v in value.items() if k != "preset"}
    elif isinstance(value, dict):
        preset = name if name in catalog.names(kind) else None
        overrides = value
    else:
        issues.append(
            Issue(
                _loc(positions, here),
                dotted(here),
                f"expected a {_singular(kind)} preset name or a mapping of fields, got {value!r}",
            )
        )
        return None
    fields = list((LinkSpec if kind == "links" else SwitchSpec).model_fields)
    unknown = [k for k in overrides if k not in fields]
    for key in unknown:
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(fields)}"
        where = (*here, key)
        issues.append(Issue(_loc(positions, where), dotted(where), f"unknown key ({hint})"))
    if unknown:
        return None
    if preset is None:  # a spec defined in full under a name of its own
        entry, entry_pos = copy.deepcopy(overrides), dict(over_pos)
    elif not isinstance(preset, str) or preset not in catalog.names(kind):
        where = (*here, "preset") if isinstance(value, dict) else here
        issues.append(Issue(_loc(positions, where), dotted(where), _unknown_preset(kind, preset)))
        return None
    else:
        entry, entry_pos = _with_preset(kind, preset, overrides, over_pos, here)
        _cite_overrides(kind, preset, overrides, entry, entry_pos, over_pos)
        if kind == "links":
            _check_measured_rate(preset, entry, here, positions, issues)
    if "name" not in overrides:
        entry["name"] = name
        if preset != name:
            entry_pos[("name",)] = over_pos.get((), _loc(positions, ref))
    return entry, entry_pos


def _cite_overrides(
    kind: catalog.Kind,
    preset: str,
    overrides: dict[str, Any],
    entry: dict[str, Any],
    entry_pos: Positions,
    over_pos: Positions,
) -> None:
    """A figure of a link or switch preset that the scenario changes is cited where it was
    changed (``sources[field]``), unless the scenario cites it itself: every number of the
    resolved scenario keeps a source."""
    raw = catalog.raw_preset(kind, preset)
    given = overrides.get("sources")
    own = given if isinstance(given, dict) else {}
    fields = (LinkSpec if kind == "links" else SwitchSpec).model_fields
    for key, value in overrides.items():
        if key in ("name", "source", "sources", "kind") or key in own or key not in fields:
            continue
        if raw.get(key) == value:
            continue
        sources = entry.get("sources")
        if not isinstance(sources, dict):
            return
        where = over_pos.get((key,), Location("the scenario"))
        sources[key] = f"set at {where} (preset {preset}: {raw.get(key)!r})"
        entry_pos[("sources", key)] = where


def _check_measured_rate(
    preset: str, entry: dict[str, Any], here: Path, positions: Positions, issues: list[Issue]
) -> None:
    """Changing a link preset's datasheet rate while keeping its measured rate (which the
    topology uses) would change nothing: the override must say what the link delivers."""
    raw = catalog.raw_preset("links", preset)
    measured = raw.get("effective_bandwidth_gbps")
    new = entry.get("bandwidth_gbps")
    if measured is None or new == raw.get("bandwidth_gbps"):
        return
    if not isinstance(new, int | float) or new <= 0:  # validation says what is wrong
        return
    if entry.get("effective_bandwidth_gbps") != measured:
        return
    at = (*here, "bandwidth_gbps")
    issues.append(
        Issue(
            _loc(positions, at),
            dotted(at),
            f"{preset}'s measured effective_bandwidth_gbps ({measured:g} GB/s), not "
            "bandwidth_gbps, is the rate the topology uses: set "
            f"{dotted((*here, 'effective_bandwidth_gbps'))} as well (the rate the link "
            "delivers, or null to use bandwidth_gbps)",
        )
    )


def _singular(kind: catalog.Kind) -> str:
    return kind[:-2] if kind.endswith("ches") else kind[:-1]


def _unknown_preset(kind: catalog.Kind, name: object) -> str:
    choices = catalog.names(kind)
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, choices, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    return f"unknown {_singular(kind)} preset {name!r}{hint}; expected one of: {', '.join(choices)}"


@cache
def _shipped_profile(file: FsPath) -> Any:
    loaded, _ = load_located(file.read_text("utf-8"), str(file), trusted=True)
    return loaded


def read_profile(file: FsPath, loc: Location, at: Path, issues: list[Issue]) -> Any:
    """A shipped profile's data (trusted catalog text, parsed once per process; each
    caller gets its own copy)."""
    try:
        loaded = copy.deepcopy(_shipped_profile(file))
    except OSError as exc:
        issues.append(
            Issue(
                loc, dotted((*at, "profile")), f"cannot read profile {str(file)!r}: {exc.strerror}"
            )
        )
        return None
    return loaded


def _expand_catalog_profile(
    data: dict[str, Any], positions: Positions, issues: list[Issue]
) -> None:
    """An accelerator's ``profile: NAME`` names a shipped profile: embed its data."""
    cluster = data.get("cluster")
    acc = cluster.get("accelerator") if isinstance(cluster, dict) else None
    if not isinstance(acc, dict) or not isinstance(acc.get("profile"), str):
        return
    at: Path = ("cluster", "accelerator")
    name = acc["profile"]
    loc = positions.get((*at, "profile"), Location(""))
    if name not in catalog.profile_names():
        shipped = ", ".join(catalog.profile_names()) or "none"
        issues.append(
            Issue(
                loc,
                dotted((*at, "profile")),
                f"unknown catalog profile {name!r}; shipped: {shipped}",
            )
        )
        return
    loaded = read_profile(FsPath(catalog.profile_path(name)), loc, at, issues)
    if loaded is not None:
        acc["profile"] = loaded
