"""How far a long simulation has got, for whoever shows it (the CLI's progress bar).

The engine does not print: a caller that wants progress sets a sink for the duration of a
run (:func:`reporting`), and the serving loop calls it with the simulated time every
``every`` iterations. Without a sink (the library's default, tests, sweeps' workers)
nothing is called. The sink lives in a context variable, so concurrent runs in threads do
not see each other's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

Sink = Callable[[float, float], None]
"""Called with (simulated seconds so far, the workload's duration in seconds)."""


@dataclass(frozen=True)
class Reporting:
    sink: Sink
    every: int
    """Iterations between two calls."""


_CURRENT: ContextVar[Reporting | None] = ContextVar("moesim_progress", default=None)


@contextmanager
def reporting(sink: Sink, every: int = 4096) -> Iterator[None]:
    """Report the progress of the runs made inside the ``with`` block to ``sink``."""
    if every < 1:
        raise ValueError("every must be at least one iteration")
    token = _CURRENT.set(Reporting(sink, every))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Reporting | None:
    """The progress sink of the run being simulated, if any."""
    return _CURRENT.get()
