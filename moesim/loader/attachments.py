"""What a scenario pulls in from other files: a measured device profile named by path, a
serving arrival trace (CSV) and a Hugging Face ``config.json``, each embedded into the
resolved scenario with located errors."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Any

from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader.presets import read_profile
from moesim.loader.yamlpos import Path, Positions


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
    loaded = read_profile(file, loc, ("cluster",), issues)
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
