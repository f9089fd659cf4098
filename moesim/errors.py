"""Located scenario errors: what went wrong, where (file:line:col), and at which field path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A place in a source: a file (or a pseudo-source such as ``--set``) and 1-based line/col."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Issue:
    """One problem with a scenario, at a field path such as ``model.top_k``."""

    location: Location
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location.file else ""
        field = f"{self.path}: " if self.path else ""
        return f"{where}{field}{self.message}"


class ScenarioError(Exception):
    """A scenario that cannot be used, with every issue found (never just the first)."""

    def __init__(self, issues: Iterable[Issue]) -> None:
        self.issues: tuple[Issue, ...] = tuple(issues)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.issues)
        head = f"{n} error{'s' if n != 1 else ''} in scenario:"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


def dotted(path: Iterable[object]) -> str:
    """Render a field path (keys and list indices) as ``a.b[2].c``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class OutputError(Exception):
    """Results that cannot be written where asked (the folder is a file, no permission);
    the command exits with EXIT_SCENARIO_ERROR."""


EXIT_SCENARIO_ERROR = 2
"""Exit status of a command that met bad input (the located errors are on stderr)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""
