"""Every plot of a run report has a title and labelled axes (inspected on the matplotlib
figures as drawn); the expert-load plot compares per-group loads with the per-group
capacity; serving latency CDFs carry their SLO line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from test_report_document import REPORT_CASES, SCENARIOS

from moesim.api import run
from moesim.loader import load_scenario
from moesim.report import document

CASES = [(file, overrides) for file, overrides, _ in REPORT_CASES]


class _Recording(document._Plots):
    """The report's plot collector, keeping every figure's axes as drawn."""

    figures: ClassVar[dict[str, Any]] = {}

    def add(self, name: str, title: str, draw: Any) -> None:
        def keep(fig: Any) -> None:
            draw(fig)
            _Recording.figures[name] = fig

        super().add(name, title, keep)


@pytest.mark.parametrize(("file", "overrides"), CASES)
def test_every_plot_has_a_title_and_axis_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, overrides: list[str]
) -> None:
    _Recording.figures = {}
    monkeypatch.setattr(document, "_Plots", _Recording)
    result = run(load_scenario(SCENARIOS / file, overrides))
    result.write_report(tmp_path)
    assert _Recording.figures
    for name, fig in _Recording.figures.items():
        assert fig.axes, name
        for ax in fig.axes:
            assert ax.get_title(), name
            assert ax.get_xlabel() and ax.get_ylabel(), name
        # the quantity plotted names its unit (or is a fraction or a count per item)
        labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)
        assert "(" in labels or "fraction" in labels or " per " in labels, (name, labels)


def test_expert_load_draws_per_group_loads_against_the_per_group_capacity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bars are the mean per-group load (whole-layer load / groups), no bar above the
    capacity line (loads are processed slots, capped by capacity in every group)."""
    _Recording.figures = {}
    monkeypatch.setattr(document, "_Plots", _Recording)
    result = run(load_scenario(SCENARIOS / "quickstart.yaml", ["workload.tokens=2048"]))
    result.write_report(tmp_path)
    s = result.summary
    ax = _Recording.figures["expert_load"].axes[0]
    heights = [p.get_height() for p in ax.patches]
    groups = s["routing_groups"]
    assert heights == pytest.approx([x / groups for x in s["expert_load"]])
    cap = s["capacity_per_expert"]
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert line.get_ydata()[0] == cap
    assert max(heights) <= cap and max(s["expert_load_max_group"]) <= cap
    # the whole-layer load exceeds the per-group capacity: the old plot's misreading
    assert max(s["expert_load"]) > cap


def test_latency_cdfs_carry_the_slo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _Recording.figures = {}
    monkeypatch.setattr(document, "_Plots", _Recording)
    file, overrides = CASES[1]
    result = run(load_scenario(SCENARIOS / file, overrides))
    result.write_report(tmp_path)
    slo = result.summary["slo"]
    for name, key in (("ttft_cdf", "ttft_ms"), ("tpot_cdf", "tpot_ms")):
        ax = _Recording.figures[name].axes[0]
        xs = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert xs == [slo[key]], name


def test_a_stall_is_a_gap_in_the_batch_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A failed device stalls the server: no iteration ends for two seconds. The batch
    line breaks there (no ramp drawn across the stall) and the failure window is shaded."""
    import numpy as np

    _Recording.figures = {}
    monkeypatch.setattr(document, "_Plots", _Recording)
    file, overrides = CASES[3]
    result = run(load_scenario(SCENARIOS / file, overrides))
    result.write_report(tmp_path)
    it = result.records.iterations
    end = np.sort(it.start_s + it.duration_s)
    longest = int(np.argmax(np.diff(end)))
    before, after = end[longest], end[longest + 1]
    assert after - before > 1.0  # the stall
    ax = _Recording.figures["batches"].axes[0]
    for line in ax.get_lines()[:2]:
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        (gap,) = np.flatnonzero(np.isnan(y))
        assert x[gap - 1] <= before + 0.05 and x[gap + 1] >= after - 0.05
    window = result.summary["failures"]["windows"][0]
    (span,) = [p for p in ax.patches if p.get_label() == "device failure"]
    assert span.get_x() == pytest.approx(window["start_s"])
    assert "failure windows shaded" in ax.get_title()
