"""A report a person reads: ``report.md`` and ``report.html`` with plots, in a run folder.

Built from the run's summary and records only (no re-simulation): the headline figures,
the verdict (:mod:`moesim.report.verdict`), workload-specific plots (PNG, drawn on
matplotlib's Agg canvas; every axis titled), the energy account, and a table of
the inputs the numbers rest on, each with its ``source:`` and, for measured device
profiles, how far the cost model was from the measurements it was fitted on. Plots are
optional decoration: the Markdown tables carry every number.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moesim.config.scenario import Scenario
from moesim.report.fields import number, scalars
from moesim.report.files import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


AddPlot = Callable[[str, str, "Callable[[Figure], None]"], None]
"""``add(name, title, draw)``: how a workload contributes a plot to ``report.md``."""


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    esc = [(a.replace("|", "\\|"), b.replace("|", "\\|")) for a, b in rows]
    return "\n".join(
        [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in esc)]
    )


DPI = 110
"""Pixels per inch of the report's plots."""


class _Plots:
    """Collects figures as PNG files under ``plots/`` and their Markdown links."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "plots"
        self.links: list[str] = []
        self.images: list[tuple[str, bytes]] = []

    def add(self, name: str, title: str, draw: Callable[[Figure], None]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # a bare Figure on the Agg canvas: no pyplot state, no backend switched for the
        # caller (a notebook keeps its inline backend); drawn at the resolution it is saved
        # at, so a text's extent on the figure is its place in pixels on the PNG
        fig = Figure(figsize=(6.4, 3.4), dpi=DPI)
        FigureCanvasAgg(fig)
        draw(fig)
        for ax in fig.axes:
            if not ax.get_title():
                ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi="figure")
        write_bytes_atomic(self.dir / f"{name}.png", buf.getvalue())
        self.images.append((title, buf.getvalue()))
        self.links.append(f"### {title}\n\n![{title}](plots/{name}.png)\n")


def _inputs(sc: Scenario) -> list[tuple[str, str]]:
    """The inputs the numbers rest on, with their sources."""
    c, m = sc.cluster, sc.model
    acc = c.accelerator
    rows = [
        (f"cluster `{c.name}`", c.source),
        (f"accelerator `{acc.name}`", acc.source),
        (f"model `{m.name}`", m.source),
        ("host", c.host.source),
    ]
    profile = c.profile or acc.profile
    if profile is not None:
        quality = [
            f"{label} median {q.median_abs_error:.1%}, worst {q.worst_abs_error:.1%} "
            f"({q.samples} samples)"
            for label, q in (
                ("GEMMs", profile.gemm_fit),
                ("layers (eager)", profile.layer_fit),
                ("layers (graph)", profile.graph_layer_fit),
            )
            if q is not None
        ]
        fit = f". Fit error on its measurements: {'; '.join(quality)}." if quality else ""
        rows.append((f"device profile ({profile.device})", profile.source + fit))
    else:
        rows.append(("device profile", "none: datasheet peaks (see the accelerator's source)"))
    return rows


def write_report(
    run_dir: Path,
    sc: Scenario,
    s: dict[str, Any],
    wall_s: float,
    draw: Callable[[AddPlot], None],
) -> Path:
    """Write ``report.md`` (and ``plots/``) into ``run_dir``; returns the report's path.

    ``draw(add)`` contributes the workload's plots (its kind's ``plots``)."""
    from moesim.report.html import render_html
    from moesim.report.verdict import run_verdict

    plots = _Plots(run_dir)
    draw(plots.add)
    context = (
        f"`{s.get('workload')}` workload of **{sc.model.name}** on **{sc.cluster.name}** "
        f"({sc.cluster.devices} devices), seed {sc.seed}; simulated in "
        f"{wall_s:.2f} s of wall time. `summary.json` holds every figure below; "
        "`scenario.yaml` reruns it."
    )
    _, sentence = run_verdict(s)
    lines = [
        f"# {sc.name}",
        "",
        f"**Verdict: {sentence}**",
        "",
        *([sc.description, ""] if sc.description else []),
        context,
        "",
        "## Results",
        "",
        _table(
            [(f"`{k}`", number(v)) for k, v in scalars(s, skip=("energy",))], ("figure", "value")
        ),
        "",
        *plots.links,
    ]
    energy = s.get("energy")
    if isinstance(energy, dict):
        rows = [(f"`{k}`", number(v)) for k, v in scalars(energy) if k != "power_source"]
        lines += ["## Energy", "", _table(rows, ("figure", "value")), ""]
        notes = energy.get("notes") or []
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        if energy.get("power_source"):
            lines += [f"Device power: {energy['power_source']}", ""]
    lines += [
        "## Inputs and their sources",
        "",
        _table(_inputs(sc), ("input", "source")),
        "",
    ]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    page = render_html(
        sc.name,
        sc.description or "",
        context.replace("**", "").replace("`", ""),
        s,
        plots.images,
        _inputs(sc),
    )
    write_text_atomic(run_dir / "report.html", page)
    return path
