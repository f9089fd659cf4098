"""Progress of long commands (sweeps, plans, long serving runs): a bar with ETA on a
terminal, plain lines elsewhere (sweeps and plans) or nothing (a run), nothing with
``--quiet`` (the caller then passes no progress callback).

Messages are the runner's lines: ``[k/n] point ...`` advances the bar (its total is n),
anything else is printed above it. Without a terminal on stderr (CI logs, pipes) no bar
is drawn: the lines are printed as they come.
"""

from __future__ import annotations

import re
import sys
from typing import Any

_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


class Progress:
    """A progress bar (tqdm) fed with the runner's messages."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def message(self, text: str) -> None:
        """One runner line: advance the bar or print the line."""
        step = _STEP.match(text)
        if not self.tty:
            print(text, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if step is None:
            tqdm.write(text, file=self.stream)
            return
        k, n = int(step.group(1)), int(step.group(2))
        if self.bar is None or self.bar.total != n:
            self.close()
            self.bar = tqdm(total=n, desc=self.label, file=self.stream, unit="run")
        self.bar.set_postfix_str(text[step.end() :].strip()[:40])
        self.bar.update(k - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SimulatedTime:
    """A bar of simulated seconds for one long run (a serving workload), fed by the
    engine's progress sink (:func:`moesim.engine.progress.reporting`); drawn only on a
    terminal. The bar's total is the workload's duration (a drain after it shows as full)."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None

    def update(self, simulated_s: float, duration_s: float) -> None:
        if not self.tty:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=round(duration_s, 1), desc=self.label, file=self.stream, unit="sim s"
            )
        self.bar.update(round(min(simulated_s, duration_s), 1) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
