"""Turn scenario files into one plain mapping: includes, presets, and ``--set`` overrides.

Everything here works on plain data plus a position map; nothing is validated yet. The
order is fixed: included files first (in order), then the scenario itself, then command-line
overrides; presets are expanded last, so an override may change a single field of a preset.
The links and switches a cluster names are expanded into its ``links`` and ``switches``
tables the same way, so the resolved scenario holds every hardware figure a run uses.
"""

from __future__ import annotations

import copy
import difflib
from functools import cache
from pathlib import Path as FsPath
from typing import Any

from moesim import catalog
from moesim.config.hardware import LinkSpec, SwitchSpec
from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader.yamlpos import Path, Positions, load_located, parse_value

#: Paths whose value may be a preset name or ``{preset: NAME, ...overrides}``, in the order
#: they are expanded (a cluster preset names its accelerator).
PRESET_PATHS: tuple[tuple[Path, catalog.Kind], ...] = (
    (("cluster",), "clusters"),
    (("cluster", "accelerator"), "accelerators"),
    (("model",), "models"),
)

#: The cluster's tables of the specs of the links and switches its fields name; each entry
#: is expanded as a preset of that kind (by default the preset of the entry's own name).
SPEC_TABLES: tuple[tuple[str, catalog.Kind], ...] = (("links", "links"), ("switches", "switches"))


def _is_preset_path(path: Path) -> bool:
    """Whether the value at ``path`` may name a preset (a string that a mapping refines
    becomes ``{preset: NAME}``): the PRESET_PATHS and the entries of the spec tables."""
    if any(path == p for p, _ in PRESET_PATHS):
        return True
    return len(path) == 3 and path[0] == "cluster" and any(path[1] == t for t, _ in SPEC_TABLES)


def read_mapping(path: str | FsPath, what: str = "a scenario") -> tuple[dict[str, Any], Positions]:
    """One YAML file that must hold a mapping, with positions (located errors)."""
    file = str(path)
    try:
        text = FsPath(path).read_text("utf-8")
    except OSError as exc:
        raise ScenarioError(
            [Issue(Location(file), "", f"cannot read file: {exc.strerror}")]
        ) from None
    data, positions = load_located(text, file)
    if not isinstance(data, dict):
        raise ScenarioError([Issue(positions[()], "", f"{what} must be a YAML mapping")])
    return data, positions


def read_file(path: str | FsPath, stack: tuple[str, ...] = ()) -> tuple[dict[str, Any], Positions]:
    """Read a scenario file and the files it includes, merged, with positions."""
    file = str(path)
    data, positions = read_mapping(path)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ScenarioError(
            [Issue(positions[("include",)], "include", "expected a file path or a list of them")]
        )
    merged: dict[str, Any] = {}
    merged_pos: Positions = {}
    for i, inc in enumerate(includes):
        target = (FsPath(file).parent / inc).resolve()
        if str(target) in stack:
            loc = positions.get(("include", i), positions[("include",)])
            raise ScenarioError([Issue(loc, "include", f"include cycle through {inc}")])
        if not target.is_file():
            loc = positions.get(("include", i), positions[("include",)])
            raise ScenarioError(
                [Issue(loc, "include", f"no such file: {inc!r} (looked for {str(target)!r})")]
            )
        sub, sub_pos = read_file(target, (*stack, str(FsPath(file).resolve())))
        _merge(merged, merged_pos, sub, sub_pos, ())
    _merge(merged, merged_pos, data, positions, ())
    return merged, merged_pos


def _merge(
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
            and _is_preset_path((*root, *here))
        ):
            base[key] = {"preset": base[key]}
            if here in base_pos:
                base_pos[(*here, "preset")] = base_pos[here]
        if isinstance(value, dict) and isinstance(base.get(key), dict) and "preset" not in value:
            _merge(base[key], base_pos, value, over_pos, here, root)
            if here in over_pos:
                base_pos[here] = over_pos[here]
            continue
        base[key] = copy.deepcopy(value)
        for p in [p for p in base_pos if p[: len(here)] == here]:
            del base_pos[p]
        for p, loc in over_pos.items():
            if p[: len(here)] == here:
                base_pos[p] = loc


def apply_overrides(
    data: dict[str, Any], positions: Positions, overrides: list[str] | tuple[str, ...]
) -> None:
    """Apply ``--set a.b.c=value`` overrides in place; values parse as YAML scalars."""
    issues: list[Issue] = []
    for text in overrides:
        loc = Location(f"--set {text}")
        if "=" not in text:
            issues.append(Issue(loc, "", "expected FIELD.PATH=VALUE"))
            continue
        key, _, raw = text.partition("=")
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        if not key.strip() or any(p == "" for p in parts):
            issues.append(Issue(loc, key, "expected a dotted field path such as model.top_k"))
            continue
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            here = tuple(parts[: depth + 1])
            child = node[part] if _has(node, part) else None
            if isinstance(child, str) and _is_preset_path(here):
                child = {"preset": child}
            if child is None:
                child = {}
            if not isinstance(child, dict | list):
                issues.append(Issue(loc, dotted(here), f"is {child!r}, not a mapping"))
                break
            _put(node, part, child)
            node = child
        else:
            value = parse_value(raw)
            if _unparsed_flow(raw):
                issues.append(Issue(loc, key, "the value is not valid YAML (an unclosed { or [?)"))
                continue
            if not _put(node, parts[-1], value):
                size = len(node) if isinstance(node, list) else 0
                issues.append(
                    Issue(
                        loc, dotted(tuple(parts)), f"no such list index: the list has {size} items"
                    )
                )
                continue
            for p in [p for p in positions if p[: len(parts)] == tuple(parts)]:
                del positions[p]
            positions[tuple(parts)] = loc
            for depth in range(1, len(parts)):  # keys the --set created are located there
                positions.setdefault(tuple(parts[:depth]), loc)
    if issues:
        raise ScenarioError(issues)


def _unparsed_flow(raw: str) -> bool:
    """Whether ``raw`` opens a YAML flow mapping or list that does not parse."""
    import yaml

    if raw.strip()[:1] not in ("{", "["):
        return False
    try:
        yaml.safe_load(raw)
    except yaml.YAMLError:
        return True
    return False


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _put(node: Any, part: str | int, value: Any) -> bool:
    """Set ``node[part]``; False when ``node`` is a list that has no such index."""
    if isinstance(node, dict):
        node[part] = value
        return True
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        node[part] = value
        return True
    return False


@cache
def _catalog_positions(kind: catalog.Kind) -> Positions:
    path = catalog.data_path(kind)
    _, positions = load_located(FsPath(path).read_text("utf-8"), _short_catalog_path(kind))
    return positions


def _short_catalog_path(kind: catalog.Kind) -> str:
    return f"moesim/catalog/data/{kind}.yaml"


def expand_presets(data: dict[str, Any], positions: Positions) -> None:
    """Replace preset names (and ``{preset: NAME, ...}``) by the preset's fields, merged."""
    issues: list[Issue] = []
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
    _expand_catalog_profile(data, positions, issues)
    _expand_specs(data, positions, issues)
    if issues:
        raise ScenarioError(issues)


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
    _merge(expanded, expanded_pos, preset, rel_cat, ())
    _merge(expanded, expanded_pos, overrides, over_pos, (), root=path)
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


def _read_profile(file: FsPath, loc: Location, at: Path, issues: list[Issue]) -> Any:
    try:
        loaded, _ = load_located(file.read_text("utf-8"), str(file))
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
    loaded = _read_profile(FsPath(catalog.profile_path(name)), loc, at, issues)
    if loaded is not None:
        acc["profile"] = loaded


def expand_profiles(data: dict[str, Any], positions: Positions, scenario_file: str) -> None:
    """Read a device profile named by path (``cluster.profile``, relative to the file that
    names it; to the working directory when it comes from ``--set``) and embed its data,
    so the resolved scenario is self-contained."""
    cluster = data.get("cluster")
    if not isinstance(cluster, dict) or not isinstance(cluster.get("profile"), str):
        return
    issues: list[Issue] = []
    loc = (
        positions.get(("cluster", "profile"))
        or positions.get(("cluster",))
        or Location(scenario_file)
    )
    if loc.file.startswith("--set"):
        base = FsPath.cwd()
    else:
        base = FsPath(loc.file or scenario_file).parent
    file = base / cluster["profile"]
    loaded = _read_profile(file, loc, ("cluster",), issues)
    if issues:
        raise ScenarioError(issues)
    cluster["profile"] = loaded


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def expand_traces(data: dict[str, Any], positions: Positions, scenario_file: str) -> None:
    """Read a serving trace named by path (``workload.arrival.path``, relative to the
    scenario file) and embed its rows as columns, so the resolved scenario is
    self-contained; problems are located at the path, with the CSV row."""
    workload = data.get("workload")
    arrival = workload.get("arrival") if isinstance(workload, dict) else None
    if not isinstance(arrival, dict) or arrival.get("kind") != "trace":
        return
    path = arrival.get("path")
    if not isinstance(path, str):
        return
    at: Path = ("workload", "arrival", "path")
    loc = (
        positions.get(at)
        or positions.get(("workload", "arrival"))
        or positions.get(("workload",))
        or Location(scenario_file)
    )
    from_set = loc.file.startswith("--set")
    file = (FsPath.cwd() if from_set else FsPath(loc.file or scenario_file).parent) / path
    try:
        columns = _read_trace(file)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ScenarioError([Issue(loc, dotted(at), f"trace {str(file)!r}: {why}")]) from None
    del arrival["path"]
    arrival["source"] = path
    arrival.update(columns)


def _read_trace(file: FsPath) -> dict[str, list[float] | list[int]]:
    """The three columns of a trace CSV (header row first); ValueError names the row."""
    import csv

    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"missing column(s) {', '.join(missing)}; the header must name "
                f"{', '.join(TRACE_COLUMNS)}, got {', '.join(header) or 'nothing'}"
            )
        reader.fieldnames = header
        arrival: list[float] = []
        prompt: list[int] = []
        output: list[int] = []
        for row in reader:
            line = reader.line_num
            try:
                arrival.append(float(row["arrival_s"]))
                prompt.append(int(row["prompt_tokens"]))
                output.append(int(row["output_tokens"]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"line {line}: expected a number and two integers, got "
                    f"{[row.get(c) for c in TRACE_COLUMNS]}"
                ) from None
    return {"arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output}


def expand_hf_models(data: dict[str, Any], positions: Positions, scenario_file: str) -> None:
    """Read a Hugging Face ``config.json`` named by ``model.hf_config`` (relative to the file
    that names it; to the working directory when it comes from ``--set``) and replace it by
    the model fields it maps to (:mod:`moesim.loader.hf_model`); the mapping's other keys
    override them. The notes on what the mapping left out are appended to ``source``."""
    import json

    from moesim.loader.hf_model import HFConfigError, model_from_hf_config

    model = data.get("model")
    if not isinstance(model, dict) or "hf_config" not in model:
        return
    at: Path = ("model", "hf_config")
    loc = positions.get(at) or positions.get(("model",)) or Location(scenario_file)
    path = model["hf_config"]
    if "preset" in model:
        raise ScenarioError(
            [Issue(loc, dotted(at), "give either model.preset or model.hf_config, not both")]
        )
    if not isinstance(path, str):
        raise ScenarioError([Issue(loc, dotted(at), "expected a path to a config.json file")])
    from_set = loc.file.startswith("--set")
    base = FsPath.cwd() if from_set else FsPath(loc.file or scenario_file).parent
    file = base / path
    try:
        cfg = json.loads(file.read_text("utf-8"))
        name = FsPath(path).parent.name or FsPath(path).stem
        fields, notes = model_from_hf_config(cfg, name, f"Hugging Face config.json: {path}")
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ScenarioError([Issue(loc, dotted(at), f"{str(file)!r}: {why}")]) from None
    except (ValueError, HFConfigError) as exc:
        raise ScenarioError([Issue(loc, dotted(at), f"{str(file)!r}: {exc}")]) from None
    if notes:
        fields["source"] = f"{fields['source']} ({'; '.join(notes)})"
    fields.update({k: v for k, v in model.items() if k != "hf_config"})
    data["model"] = fields
