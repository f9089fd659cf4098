"""JSON Schemas of the scenario language: the resolved form, and the form people write.

The pydantic models describe a *resolved* scenario (presets expanded, files read). A file
as written may also name presets (``cluster: dgx-h100``), refine them
(``model: {preset: mixtral-8x7b, experts: 16}``), read a Hugging Face config
(``model: {hf_config: config.json}``), name a device profile by path, give only some
fields of a cluster's link and switch specs (``links: {nvlink4: {latency_us: 1}}``, the
rest from the preset of that name), and ``include`` other files (which may supply any
section, so none is required). :func:`authoring_schema`
widens the resolved schema accordingly, for editors' YAML plugins.
"""

from __future__ import annotations

import copy
from typing import Any

from moesim import catalog
from moesim.config.scenario import Scenario


def resolved_schema() -> dict[str, Any]:
    """The schema of a fully resolved scenario (what a run folder's scenario.yaml holds)."""
    schema = Scenario.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "moesim scenario (resolved)"
    return schema


def _preset_or(kind: catalog.Kind, full: dict[str, Any], *extra: dict[str, Any]) -> dict[str, Any]:
    """A preset name, a preset with overrides, any ``extra`` forms, or the full definition."""
    names = sorted(catalog.names(kind))
    description = full.get("description", "")
    one = kind[:-2] if kind.endswith("ches") else kind[:-1]
    one = f"an {one}" if one[0] in "aeiou" else f"a {one}"
    return {
        "description": description,
        "anyOf": [
            {"type": "string", "enum": names, "description": f"{one} preset"},
            {
                "type": "object",
                "required": ["preset"],
                "properties": {"preset": {"type": "string", "enum": names}},
                "additionalProperties": True,
                "description": f"{one} preset with fields overridden",
            },
            *extra,
            {k: v for k, v in full.items() if k != "description"},
        ],
    }


def _spec_table(kind: catalog.Kind, table: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A cluster's ``links`` / ``switches`` as written: each entry a preset name, a preset
    with overrides, or some fields of a spec (the rest from the preset of the entry's name)."""
    some_fields = {k: v for k, v in spec.items() if k not in ("required", "description", "title")}
    some_fields["description"] = "fields of the spec: over the preset of the entry's name, or all"
    entry = _preset_or(kind, some_fields)
    entry.pop("description", None)
    return {
        "description": table.get("description", ""),
        "type": "object",
        "additionalProperties": entry,
    }


def authoring_schema() -> dict[str, Any]:
    """The schema of a scenario file as written (see the module docstring)."""
    schema = copy.deepcopy(resolved_schema())
    schema["title"] = "moesim scenario"
    schema.pop("required", None)
    props = schema["properties"]
    props["include"] = {
        "description": "other scenario files merged first (relative to this file); this "
        "file's values win",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    props["cluster"] = _preset_or("clusters", props["cluster"])
    props["model"] = _preset_or(
        "models",
        props["model"],
        {
            "type": "object",
            "required": ["hf_config"],
            "properties": {"hf_config": {"type": "string"}},
            "additionalProperties": True,
            "description": "a Hugging Face config.json (path), fields overridden",
        },
    )
    defs = schema.get("$defs", {})
    serving = defs.get("ServingWorkload", {}).get("properties", {})
    if "engine" in serving:
        serving["engine"] = _preset_or("engines", serving["engine"])
    for name in ("NodesCluster", "TorusCluster"):
        cluster = defs.get(name)
        if not cluster:
            continue
        cp = cluster["properties"]
        cp["accelerator"] = _preset_or("accelerators", cp["accelerator"])
        tables: tuple[tuple[catalog.Kind, str], ...] = (
            ("links", "LinkSpec"),
            ("switches", "SwitchSpec"),
        )
        for kind, spec in tables:
            if kind in cp and spec in defs:
                cp[kind] = _spec_table(kind, cp[kind], defs[spec])
        cp["profile"] = {
            "description": cp.get("profile", {}).get("description", ""),
            "anyOf": [
                {"type": "string", "description": "a profile file or a catalog profile name"},
                {k: v for k, v in cp.get("profile", {}).items() if k != "description"},
            ],
        }
    return schema
