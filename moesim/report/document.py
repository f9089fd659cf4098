"""A report a person reads: ``report.md`` with plots, written into a run folder.

Built from the run's summary and records only (no re-simulation): the headline figures,
workload-specific plots (PNG, matplotlib's Agg backend), the energy account, and a table of
the inputs the numbers rest on, each with its ``source:`` and, for measured device
profiles, how far the cost model was from the measurements it was fitted on. Plots are
optional decoration: the Markdown tables carry every number.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moesim.report.fields import number, scalars
from moesim.report.files import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moesim.api import Result


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    esc = [(a.replace("|", "\\|"), b.replace("|", "\\|")) for a, b in rows]
    return "\n".join(
        [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in esc)]
    )


class _Plots:
    """Collects figures as PNG files under ``plots/`` and their Markdown links."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "plots"
        self.links: list[str] = []
        import matplotlib

        matplotlib.use("Agg")

    def add(self, name: str, title: str, draw: Callable[[Figure], None]) -> None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(6.4, 3.2))
        try:
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
        finally:
            plt.close(fig)
        write_bytes_atomic(self.dir / f"{name}.png", buf.getvalue())
        self.links.append(f"### {title}\n\n![{title}](plots/{name}.png)\n")


def _layer_plots(result: Result, plots: _Plots) -> None:
    s = result.summary
    load = s["expert_load"]
    cap = s.get("capacity_per_expert")

    def experts(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.bar(range(len(load)), load, color="C0")
        if cap:
            ax.axhline(cap, color="C3", ls="--", label=f"capacity {cap}")
            ax.legend()
        ax.set_xlabel("expert")
        ax.set_ylabel("token choices processed")

    plots.add("expert_load", "Expert load (what each expert processed)", experts)
    busy = s["device_time_ms"]

    def devices(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.bar(range(len(busy)), busy, color="C1")
        ax.axhline(s["time_ms"], color="k", ls=":", label="layer time")
        ax.set_xlabel("device")
        ax.set_ylabel("busy time (ms)")
        ax.legend()

    plots.add("device_time", "Busy time per device", devices)


def _serving_plots(result: Result, plots: _Plots) -> None:
    from moesim.engine.serving import ServingRecords

    rec = result.records
    assert isinstance(rec, ServingRecords)
    it, req = rec.iterations, rec.requests
    if len(it.start_s):
        end = it.start_s + it.duration_s

        bins = np.linspace(0.0, float(end[-1]), min(200, len(end)) + 1)
        mid = (bins[:-1] + bins[1:]) / 2
        count = np.histogram(end, bins)[0]
        seen = count > 0

        def mean_per_bin(values: np.ndarray) -> np.ndarray:
            total = np.histogram(end, bins, weights=values.astype(float))[0]
            return np.asarray(total[seen] / count[seen])

        def batches(fig: Figure) -> None:
            ax = fig.add_subplot()
            ax.plot(mid[seen], mean_per_bin(it.batch_tokens), lw=1, label="tokens")
            ax.plot(mid[seen], mean_per_bin(it.running_seqs), lw=1, label="sequences")
            ax.set_xlabel("simulated time (s)")
            ax.set_ylabel("per iteration (mean)")
            ax.legend()

        plots.add("batches", "Batch size over time", batches)
    done = np.isfinite(req.first_token_s)
    windows = (result.summary.get("failures") or {}).get("windows") or []
    if windows and done.any():
        arrival = req.arrival_s[done]
        first = (req.first_token_s[done] - arrival) * 1e3

        def over_time(fig: Figure) -> None:
            ax = fig.add_subplot()
            colors = {"device_failure": "C3", "straggler": "C1", "link": "C4"}
            for wdw in windows:
                ax.axvspan(
                    wdw["start_s"],
                    wdw["end_s"],
                    color=colors.get(wdw["kind"], "0.6"),
                    alpha=0.2,
                    label=wdw["kind"].replace("_", " "),
                )
            ax.scatter(arrival, first, s=3, color="C0", label="requests")
            ax.set_yscale("log")
            ax.set_xlabel("arrival (simulated s)")
            ax.set_ylabel("time to first token (ms)")
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=7)

        plots.add(
            "ttft_over_time", "Time to first token over the run, failure windows shaded", over_time
        )
    ttft = (req.first_token_s - req.arrival_s)[done] * 1e3
    if len(ttft):

        def latency(fig: Figure) -> None:
            ax = fig.add_subplot()
            x = np.sort(ttft)
            ax.plot(x, np.arange(1, len(x) + 1) / len(x))
            ax.set_xscale("log")
            ax.set_xlabel("time to first token (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)

        plots.add("ttft_cdf", "Time to first token (CDF, all requests)", latency)


def _training_plots(result: Result, plots: _Plots) -> None:
    s = result.summary
    parts = s["breakdown_ms"]

    def breakdown(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.barh(list(parts), list(parts.values()), color="C2")
        ax.set_xlabel("ms per step")

    plots.add("breakdown", "Where a training step goes", breakdown)
    stages = s.get("stage_ms") or []
    if len(stages) > 1:

        def per_stage(fig: Figure) -> None:
            ax = fig.add_subplot()
            x = np.arange(len(stages))
            fwd = [st["forward"] for st in stages]
            bwd = [st["backward"] for st in stages]
            ax.bar(x, fwd, label="forward")
            ax.bar(x, bwd, bottom=fwd, label="backward")
            ax.set_xlabel("pipeline stage")
            ax.set_ylabel("ms per micro-batch")
            ax.legend()

        plots.add("stages", "Per-stage time of one micro-batch", per_stage)


def _inputs(result: Result) -> list[tuple[str, str]]:
    """The inputs the numbers rest on, with their sources."""
    sc = result.scenario
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


def write_report(result: Result, run_dir: Path) -> Path:
    """Write ``report.md`` (and ``plots/``) into ``run_dir``; returns the report's path."""
    s = result.summary
    sc = result.scenario
    plots = _Plots(run_dir)
    drawers = {"layer": _layer_plots, "serving": _serving_plots, "training": _training_plots}
    drawers.get(str(s.get("workload")), _layer_plots)(result, plots)
    lines = [
        f"# {sc.name}",
        "",
        *([sc.description, ""] if sc.description else []),
        f"`{s.get('workload')}` workload of **{sc.model.name}** on **{sc.cluster.name}** "
        f"({sc.cluster.devices} devices), seed {sc.seed}; simulated in "
        f"{result.wall_s:.2f} s of wall time. `summary.json` holds every figure below; "
        "`scenario.yaml` reruns it.",
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
        _table(_inputs(result), ("input", "source")),
        "",
    ]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
