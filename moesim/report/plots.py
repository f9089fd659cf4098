"""The workload plots of ``report.md``: pure functions of a run's summary and records that
draw onto figures handed to them (``add(name, title, draw)``), so they never write files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.engine.serving import ServingRecords
from moesim.report.document import AddPlot
from moesim.report.serving import latencies_s

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


def _log_axis(axis: Axis) -> None:
    """A log-scaled axis, once everything is drawn on it, labelled in plain numbers (1, 2,
    5, 10, 20 ... over at most two decades shown, powers of ten beyond), so that no two
    tick labels overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    span = np.log10(hi / lo) if lo > 0 else 0.0
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if span <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def layer_plots(s: dict[str, Any], add: AddPlot) -> None:
    """Expert load per routing group against the per-group capacity, and busy time per
    device of one layer."""
    load = np.asarray(s["expert_load"], dtype=float)
    cap = s.get("capacity_per_expert")
    groups = int(s.get("routing_groups") or 1)
    peak = s.get("expert_load_max_group")

    def experts(fig: Figure) -> None:
        ax = fig.add_subplot()
        x = np.arange(len(load))
        ax.bar(x, load / groups, color="C0", label=f"mean over the {groups} routing groups")
        if peak is not None:
            ax.scatter(x, peak, color="C1", marker="_", s=120, label="busiest group")
        if cap:
            ax.axhline(cap, color="C3", ls="--", label=f"capacity per group ({cap})")
        ax.set_xlabel("expert")
        ax.set_ylabel("token choices per routing group")
        ax.legend(fontsize=7)

    add("expert_load", "Expert load per routing group (rank) against its capacity", experts)
    busy = s["device_time_ms"]

    def devices(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.bar(range(len(busy)), busy, color="C1")
        ax.axhline(s["time_ms"], color="k", ls=":", label="layer time")
        ax.set_xlabel("device")
        ax.set_ylabel("busy time (ms)")
        ax.legend(fontsize=7)

    add("device_time", "Busy time per device in the layer", devices)


def _shade(ax: Any, windows: list[dict[str, Any]]) -> None:
    """The failure windows as shaded spans, one legend entry per kind."""
    colors = {"device_failure": "C3", "straggler": "C1", "link": "C4"}
    for wdw in windows:
        kind = wdw["kind"].replace("_", " ")
        labelled = kind in ax.get_legend_handles_labels()[1]
        ax.axvspan(
            wdw["start_s"],
            wdw["end_s"],
            color=colors.get(wdw["kind"], "0.6"),
            alpha=0.2,
            label=None if labelled else kind,
        )


def serving_plots(summary: dict[str, Any], rec: ServingRecords, add: AddPlot) -> None:
    """Batch size over time (failure windows shaded), TTFT over time around failure
    windows, the TTFT and TPOT CDFs against the SLO."""
    it, req = rec.iterations, rec.requests
    windows = (summary.get("failures") or {}).get("windows") or []
    if len(it.start_s):
        end = it.start_s + it.duration_s

        bins = np.linspace(0.0, float(end[-1]), min(200, len(end)) + 1)
        mid = (bins[:-1] + bins[1:]) / 2
        count = np.histogram(end, bins)[0]

        seen = count > 0
        # a stall (no iteration ends for 5% of the run, e.g. a failed device) is a gap in
        # the line, not a ramp drawn across it
        x = mid[seen]
        stall = np.flatnonzero(np.diff(x) > 10 * (bins[1] - bins[0])) + 1

        def mean_per_bin(values: np.ndarray) -> np.ndarray:
            total = np.histogram(end, bins, weights=values.astype(float))[0]
            return np.insert(total[seen] / count[seen], stall, np.nan)

        def batches(fig: Figure) -> None:
            ax = fig.add_subplot()
            at = np.insert(x, stall, np.nan)
            ax.plot(at, mean_per_bin(it.batch_tokens), lw=1, label="tokens")
            ax.plot(at, mean_per_bin(it.running_seqs), lw=1, label="sequences")
            _shade(ax, windows)
            ax.set_xlabel("simulated time (s)")
            ax.set_ylabel("per iteration (mean, count)")
            warm = summary.get("warmup_s")
            if warm:
                ax.axvspan(0, warm, color="0.85", label="warm-up")
            steady = summary.get("steady_state") or {}
            if steady.get("start_s") is not None:
                ax.axvline(steady["start_s"], color="k", ls=":", label="steady state from")
            ax.legend(fontsize=7)

        shaded = ", failure windows shaded" if windows else ""
        add("batches", f"Batch size over time{shaded}", batches)
    done = np.isfinite(req.first_token_s)
    if windows and done.any():
        arrival = req.arrival_s[done]
        first = (req.first_token_s[done] - arrival) * 1e3

        def over_time(fig: Figure) -> None:
            ax = fig.add_subplot()
            _shade(ax, windows)
            ax.scatter(arrival, first, s=3, color="C0", label="requests")
            ax.set_yscale("log")
            ax.set_xlabel("arrival (simulated s)")
            ax.set_ylabel("time to first token (ms)")
            ax.legend(fontsize=7)
            _log_axis(ax.yaxis)

        add("ttft_over_time", "Time to first token over the run, failure windows shaded", over_time)
    slo = summary.get("slo") or {}
    lat = latencies_s(rec)
    for key, name, label in (
        ("ttft", "ttft_cdf", "time to first token"),
        ("tpot", "tpot_cdf", "time per output token"),
    ):
        values = lat[key][np.isfinite(lat[key])] * 1e3
        if not len(values):
            continue
        target = slo.get(f"{key}_ms")

        def cdf(fig: Figure, v: np.ndarray = values, t: Any = target, what: str = label) -> None:
            ax = fig.add_subplot()
            x = np.sort(v)
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label="requests")
            if t is not None:
                ax.axvline(t, color="C3", ls="--", label=f"SLO {t:g} ms")
            ax.axhline(0.99, color="0.5", ls=":", lw=0.8, label="p99")
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.set_xlabel(f"{what} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

        add(name, f"{label.capitalize()} (CDF, all requests) against the SLO", cdf)


def training_plots(s: dict[str, Any], add: AddPlot) -> None:
    """Where a step goes, and per-stage times with pipeline parallelism."""
    parts = s["breakdown_ms"]

    def breakdown(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.barh([k.replace("_", " ") for k in parts], list(parts.values()), color="C2")
        ax.set_xlabel("time per step (ms)")
        ax.set_ylabel("part of the step")

    add("breakdown", "Where a training step goes", breakdown)
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
            ax.set_ylabel("time per micro-batch (ms)")
            ax.legend()

        add("stages", "Per-stage time of one micro-batch", per_stage)
