"""A sweep's table (varied fields, metrics, feasibility, Pareto front) and its front plot."""

from __future__ import annotations

import json
from pathlib import Path

from moesim.report.fields import number
from moesim.sweep.runner import SweepResult


def sweep_table(r: SweepResult) -> str:
    """One row per point; ``*`` marks the Pareto front, ``x`` an infeasible point."""
    keys = list(r.points[0].values) if r.points else []
    head = ["", "point", *keys, *r.config.metrics, "why not"]
    best = set(r.pareto)
    reasons = r.reasons or ["" for _ in r.points]
    body = [
        [
            "*" if p.index in best else ("x" if not ok else ""),
            str(p.index),
            *(json.dumps(p.values[k]) for k in keys),
            *(number(row[m]) for m in r.config.metrics),
            "" if ok else why,
        ]
        for p, row, ok, why in zip(r.points, r.rows, r.feasible, reasons)
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1]
        for line in [head, *body]
    ]
    notes = [f"{sum(r.feasible)} of {len(r.points)} points feasible"]
    if r.config.constraints:
        bounds = ", ".join(
            f"{m}"
            + (f" <= {b.max:g}" if b.max is not None else "")
            + (f" >= {b.min:g}" if b.min is not None else "")
            for m, b in r.config.constraints.items()
        )
        notes[0] += f" ({bounds}; x = infeasible)"
    else:
        notes[0] += " (fits in memory, keeps up with the load; x = infeasible)"
    o = r.config.objectives
    if o.minimize or o.maximize:
        goals = [f"min {m}" for m in o.minimize] + [f"max {m}" for m in o.maximize]
        notes.append(f"Pareto front (*) over {', '.join(goals)}: points {r.pareto}")
    notes.append(f"ran {r.ran}, reused {r.reused}; results in {r.folder}")
    return "\n".join([*lines, "", *notes])


def axis_label(path: str) -> str:
    """A dotted summary path as an axis label with its unit (from the field's name)."""
    units = {
        "_tokens_per_s": "tokens/s",
        "_per_s": "1/s",
        "_ms": "ms",
        "_j": "J",
        "_s": "s",
        "_w": "W",
        "_gib": "GiB",
    }
    parts = path.split(".")
    for part in reversed(parts):
        for suffix, unit in units.items():
            if part.endswith(suffix):
                return f"{path} ({unit})"
    return path


def pareto_plot(r: SweepResult, path: Path) -> bool:
    """Scatter of the first two objectives with the front highlighted; False (nothing
    written) unless the sweep has exactly two objectives."""
    o = r.config.objectives
    names = [*o.minimize, *o.maximize]
    if len(names) != 2:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from moesim.report.files import write_bytes_atomic

    x, y = names
    pts = [
        (float(a), float(b), i)
        for i, row in enumerate(r.rows)
        if (a := row[x]) is not None and (b := row[y]) is not None
    ]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    best = set(r.pareto)
    for label, pick, style in (
        ("infeasible", lambda i: not r.feasible[i], dict(marker="x", color="0.6")),
        ("feasible", lambda i: r.feasible[i] and i not in best, dict(marker="o", color="C0")),
        ("Pareto front", lambda i: i in best, dict(marker="*", s=120, color="C3")),
    ):
        sel = [(a, b) for a, b, i in pts if pick(i)]
        if sel:
            ax.scatter([a for a, _ in sel], [b for _, b in sel], label=label, **style)
    for a, b, i in pts:
        ax.annotate(str(i), (a, b), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(f"{r.config.name}: Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_bytes_atomic(path, buf.getvalue())
    return True
