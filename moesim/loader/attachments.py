"""What a scenario pulls in from other files: a measured device profile named by path, a
serving arrival trace (CSV) and a Hugging Face ``config.json``, each embedded into the
resolved scenario with located errors."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Any

from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader.files import (
    MAX_JSON_BYTES,
    MAX_TRACE_BYTES,
    MAX_YAML_BYTES,
    PathPolicy,
    read_input,
)
from moesim.loader.yamlpos import Path, Positions, decode_text, load_located


def _source(
    loc: Location, scenario_file: str, written: str, policy: PathPolicy | None, limit: int
) -> tuple[FsPath, bytes]:
    """The file a path names (relative to the file it is written in, to the working
    directory when it comes from ``--set``) and its bytes, read under ``policy``."""
    from_set = loc.file.startswith("--set")
    base = FsPath.cwd() if from_set else FsPath(loc.file or scenario_file).parent
    file = base / written
    return file, read_input(file, limit, loc, "", policy, from_set)


def expand_profiles(
    data: dict[str, Any],
    positions: Positions,
    scenario_file: str,
    policy: PathPolicy | None = None,
) -> None:
    """Read a device profile named by path (``cluster.profile``, relative to the file that
    names it; to the working directory when it comes from ``--set``) and embed its data,
    so the resolved scenario is self-contained."""
    cluster = data.get("cluster")
    if not isinstance(cluster, dict) or not isinstance(cluster.get("profile"), str):
        return
    loc = (
        positions.get(("cluster", "profile"))
        or positions.get(("cluster",))
        or Location(scenario_file)
    )
    file, raw = _located(
        lambda: _source(loc, scenario_file, cluster["profile"], policy, MAX_YAML_BYTES),
        "cluster.profile",
    )
    # the bytes already read (bounded, checked): reading the path again could find another file
    cluster["profile"], _ = load_located(decode_text(raw, str(file)), str(file))


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def _located(read: Any, field_path: str) -> tuple[FsPath, bytes]:
    """``read()``, with the field path put on its errors."""
    try:
        result: tuple[FsPath, bytes] = read()
    except ScenarioError as exc:
        raise ScenarioError(
            [Issue(i.location, i.path or field_path, i.message) for i in exc.issues]
        ) from None
    return result


def expand_traces(
    data: dict[str, Any],
    positions: Positions,
    scenario_file: str,
    policy: PathPolicy | None = None,
) -> None:
    """Read a serving trace named by path (``workload.arrival.path``, relative to the
    scenario file) and embed its rows as columns, so the resolved scenario is
    self-contained; problems are located at the path, with the CSV row."""
    _routing_trace(data, positions, scenario_file, policy)
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
    file, raw = _located(
        lambda: _source(loc, scenario_file, path, policy, MAX_TRACE_BYTES), dotted(at)
    )
    try:
        columns = _read_trace(raw)
    except ValueError as exc:
        raise ScenarioError([Issue(loc, dotted(at), f"trace {str(file)!r}: {exc}")]) from None
    del arrival["path"]
    arrival["source"] = path
    arrival.update(columns)


def _routing_trace(
    data: dict[str, Any], positions: Positions, scenario_file: str, policy: PathPolicy | None
) -> None:
    """A routing trace (``routing.path``, relative to the file it is written in) stays a
    file, read in chunks at run time: here its path is made absolute and checked against
    the file policy; its contents are checked against the model by the rules."""
    import os

    routing = data.get("routing")
    if not isinstance(routing, dict) or routing.get("kind") != "trace":
        return
    written = routing.get("path")
    if not isinstance(written, str) or not written:
        return
    at: Path = ("routing", "path")
    loc = positions.get(at) or positions.get(("routing",)) or Location(scenario_file)
    from_set = loc.file.startswith("--set")
    base = FsPath.cwd() if from_set else FsPath(loc.file or scenario_file).parent
    file = FsPath(os.path.abspath(base / written))
    why = policy.problem(file, from_set) if policy is not None else None
    if why is None and not file.is_file():
        why = f"cannot read trace {str(file)!r}: " + (
            "not a regular file" if file.exists() else "no such file"
        )
    if why:
        raise ScenarioError([Issue(loc, dotted(at), why)])
    routing["path"] = str(file)
    routing.setdefault("source", written)


def _read_trace(raw: bytes) -> dict[str, list[float] | list[int]]:
    """The three columns of a trace CSV (header row first); ValueError names the row and
    column, never the file's contents."""
    import csv
    import io
    import math

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 text") from None
    if "\0" in text:
        raise ValueError(f"line {text[: text.index(chr(0))].count(chr(10)) + 1}: a NUL byte")
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            header = [str(h).strip() for h in reader.fieldnames or []]
        except csv.Error:
            raise ValueError("line 1: not a CSV header") from None
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"missing column(s) {', '.join(missing)}; the header (line 1) must name "
                f"{', '.join(TRACE_COLUMNS)}"
            )
        reader.fieldnames = header
        arrival: list[float] = []
        prompt: list[int] = []
        output: list[int] = []
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error:
                raise ValueError(f"line {reader.line_num}: not valid CSV") from None
            line = reader.line_num
            for column, kind in zip(TRACE_COLUMNS, (float, int, int)):
                cell = str(row.get(column) or "").strip()
                try:
                    value = kind(cell) if len(cell) <= 30 else None
                except ValueError:
                    value = None
                if value is None or not math.isfinite(value):
                    want = "a finite number" if kind is float else "an integer"
                    raise ValueError(f"line {line}: column {column} must be {want}")
            arrival.append(float(row["arrival_s"]))
            prompt.append(int(row["prompt_tokens"]))
            output.append(int(row["output_tokens"]))
    return {"arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output}


def expand_hf_models(
    data: dict[str, Any],
    positions: Positions,
    scenario_file: str,
    policy: PathPolicy | None = None,
) -> None:
    """Read a Hugging Face ``config.json`` named by ``model.hf_config`` (relative to the file
    that names it; to the working directory when it comes from ``--set``) and replace it by
    the model fields it maps to (:mod:`moesim.loader.hf_model`); the mapping's other keys
    override them. The notes on what the mapping left out are appended to ``source``."""
    from moesim.loader.hf_model import HFConfigError

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
    file, raw = _located(
        lambda: _source(loc, scenario_file, path, policy, MAX_JSON_BYTES), dotted(at)
    )
    try:
        name = FsPath(path).parent.name or FsPath(path).stem
        fields, notes = hf_model_fields(raw, name, path)
    except HFConfigError as exc:
        raise ScenarioError([Issue(loc, dotted(at), f"{str(file)!r}: {exc}")]) from None
    if notes:
        fields["source"] = f"{fields['source']} ({'; '.join(notes)})"
    fields.update({k: v for k, v in model.items() if k != "hf_config"})
    data["model"] = fields


def hf_model_fields(raw: bytes, name: str, written: str) -> tuple[dict[str, Any], list[str]]:
    """The model fields (and notes) of a ``config.json``'s bytes; HFConfigError says why
    not, without echoing the file's contents (not JSON, too deep, a value of the wrong
    type)."""
    import json

    from moesim.loader.hf_model import HFConfigError, model_from_hf_config

    try:
        cfg = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise HFConfigError(f"not valid JSON{where}") from None
    try:
        return model_from_hf_config(cfg, name, f"Hugging Face config.json: {written}")
    except HFConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        raise HFConfigError("a key has a value of the wrong type") from None


def _no_constant(name: str) -> Any:
    """JSON's NaN and Infinity are not numbers a model has."""
    raise ValueError(f"{name} is not a JSON number")
