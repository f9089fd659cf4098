"""Measurement records: one JSON object per line with a ``kind`` (the team's format, as in
``moesim/catalog/measurements/*.jsonl``). Appended and flushed line by line, so an
interrupted measurement keeps what it measured."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

Record = dict[str, Any]


def read(path: str | Path) -> list[Record]:
    """All records of a JSONL file (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


def of_kind(records: Iterable[Record], kind: str) -> list[Record]:
    return [r for r in records if r.get("kind") == kind]


class Writer:
    """Appends records to a JSONL file (or keeps them only in memory when path is None)."""

    def __init__(self, path: str | Path | None) -> None:
        self.records: list[Record] = []
        self._f: TextIO | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, record: Record) -> None:
        self.records.append(record)
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def measured_s(record: Record) -> float:
    """A measured layer's time in seconds: its CUDA-graph replay time where the harness took
    one (device time, as graph-captured inference runs it), else its eager time."""
    graph = record.get("ms_graph")
    return float(graph if graph else record["ms"]) * 1e-3


def timing(record: Record) -> str:
    """'graph' or 'eager': which measurement :func:`measured_s` returns."""
    return "graph" if record.get("ms_graph") else "eager"
