"""Progress of a long serving run: the engine's sink and the CLI's bar of simulated time."""

from __future__ import annotations

import io

import pytest

import moesim
from moesim.engine.progress import current, reporting
from moesim.report.progress import SimulatedTime

SHORT = ["workload.duration_s=3", "workload.warmup_s=1"]


def test_the_sink_sees_the_simulated_time_grow_and_nothing_without_it() -> None:
    scenario = moesim.load_scenario("scenarios/mixtral-serving-dgx-h100.yaml", SHORT)
    calls: list[tuple[float, float]] = []
    with reporting(lambda t, d: calls.append((t, d)), every=50):
        assert current() is not None
        with_bar = moesim.run(scenario).summary
    assert current() is None
    n = with_bar["iterations"]
    assert len(calls) == n // 50 > 0
    times = [t for t, _ in calls]
    assert times == sorted(times) and all(d == 3.0 for _, d in calls)
    without = moesim.run(scenario).summary
    for s in (with_bar, without):
        s.pop("wall_s", None)
        s.pop("sim_seconds_per_wall_second", None)
    assert with_bar == without  # reporting never changes a result
    with pytest.raises(ValueError), reporting(lambda t, d: None, every=0):
        pass


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_only() -> None:
    tty = _Terminal()
    bar = SimulatedTime("run", tty)
    bar.update(1.5, 3.0)
    bar.update(4.0, 3.0)  # the drain after the duration shows as full
    assert bar.bar is not None and bar.bar.n == 3.0
    bar.close()
    assert "sim s" in tty.getvalue() and "run" in tty.getvalue()
    pipe = io.StringIO()
    quiet = SimulatedTime("run", pipe)
    quiet.update(1.0, 3.0)
    quiet.close()
    assert pipe.getvalue() == ""


def test_run_takes_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    from moesim.cli import main

    path = "scenarios/mixtral-serving-dgx-h100.yaml"
    args = ["run", path, "--no-write", "--quiet", *[a for s in SHORT for a in ("--set", s)]]
    assert main(args) == 0
    assert "sim s" not in capsys.readouterr().err


def test_calibration_layers_report_k_of_n() -> None:
    """The numpy calibration's layer timings come as ``[k/n]`` lines (a bar with ETA on a
    terminal, through :class:`moesim.report.progress.Progress`), k running 1..n."""
    import dataclasses
    import re

    from moesim.calibrate.numpy_bench import SIZES, measure_layers
    from moesim.calibrate.records import Writer

    tiny = dataclasses.replace(
        SIZES["ci"], scale=64, tokens=(1, 8), max_gflop=0.05, min_time_s=0.0
    )
    lines: list[str] = []
    measure_layers(Writer(None), tiny, ("mixtral-8x7b",), 1, lines.append)
    steps = [re.match(r"^\[(\d+)/(\d+)\] mixtral-8x7b T=\d+ (uniform|zipf1): ", s) for s in lines]
    assert lines and all(steps), lines
    n = len(lines)
    assert [(int(m.group(1)), int(m.group(2))) for m in steps if m] == [
        (k, n) for k in range(1, n + 1)
    ]
