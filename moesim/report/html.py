"""``report.html``: a self-contained page (plots embedded as PNG data) rendered with a
jinja2 template: the verdict first, then the headline figures, the plots (titles, axis
labels with units, SLO lines, failure windows shaded), the energy account and the inputs
with their sources. ``report.md`` holds the same numbers as Markdown."""

from __future__ import annotations

import base64
from typing import Any

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ name }}: moesim report</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; }
.verdict { padding: 0.8rem 1rem; border-radius: 6px; font-size: 1.15rem; }
.ok { background: #e6f4ea; border: 1px solid #34a853; }
.bad { background: #fce8e6; border: 1px solid #d93025; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
td, th { border-bottom: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } img { max-width: 100%; }
</style>
</head>
<body>
<h1>{{ name }}</h1>
<p class="verdict {{ 'ok' if feasible else 'bad' }}" id="verdict">{{ verdict }}</p>
{% if description %}<p>{{ description }}</p>{% endif %}
<p>{{ context }}</p>
<h2>Headline figures</h2>
<table>{% for label, value in headline %}
<tr><th>{{ label }}</th><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
{% if notes %}<ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
<h2>Plots</h2>
{% for p in plots %}<figure><img alt="{{ p.title }}" src="data:image/png;base64,{{ p.data }}">
<figcaption>{{ p.title }}</figcaption></figure>
{% endfor %}
<h2>Energy</h2>
<table>{% for label, value in energy %}
<tr><th>{{ label }}</th><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
<h2>Inputs and their sources</h2>
<table><tr><th>input</th><th>source</th></tr>{% for what, src in inputs %}
<tr><td>{{ what }}</td><td>{{ src }}</td></tr>{% endfor %}
</table>
<h2>Every figure</h2>
<details><summary>{{ fields|length }} fields of summary.json</summary>
<table>{% for k, v in fields %}<tr><td><code>{{ k }}</code></td><td class="num">{{ v }}</td></tr>
{% endfor %}</table></details>
</body>
</html>
"""


def _headline(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures a reader looks for first, by workload, with units."""
    from moesim.report.fields import metric, number

    e = s.get("energy") or {}
    rows: list[tuple[str, Any]]
    if s.get("workload") == "serving":
        rows = [
            ("offered load (requests/s)", s.get("offered_requests_per_s")),
            (
                "throughput, steady state (output tokens/s)",
                metric(s, "steady_state.throughput_tokens_per_s"),
            ),
            ("keeps up (generated / due, steady state)", metric(s, "steady_state.keep_up")),
            (
                "TTFT p50 / p99 (ms)",
                f"{number(metric(s, 'ttft_ms.p50'))} / {number(metric(s, 'ttft_ms.p99'))}",
            ),
            (
                "TPOT p50 / p99 (ms)",
                f"{number(metric(s, 'tpot_ms.p50'))} / {number(metric(s, 'tpot_ms.p99'))}",
            ),
            ("SLO attainment, both", metric(s, "slo_attainment.both")),
            ("energy per output token, steady state (J)", e.get("steady_energy_per_token_j")),
            ("energy per output token, whole run (J)", e.get("energy_per_token_j")),
        ]
    elif s.get("workload") == "training":
        rows = [
            ("step time (ms)", s.get("step_time_ms")),
            ("tokens per step", s.get("tokens_per_step")),
            ("tokens/s", s.get("tokens_per_s")),
            ("MFU", s.get("mfu")),
            ("peak memory per device (GiB)", metric(s, "memory_gib.total")),
            ("energy per trained token (J)", e.get("energy_per_token_j")),
        ]
    else:
        rows = [
            ("layer time (ms)", s.get("time_ms")),
            ("tokens", s.get("tokens")),
            ("dropped share of token choices", s.get("dropped_fraction")),
            ("load imbalance (device max / mean)", s.get("load_imbalance")),
            ("energy per token (J)", e.get("energy_per_token_j")),
        ]
    rows.insert(0, ("devices", s.get("devices")))
    return [(k, v if isinstance(v, str) else number(v)) for k, v in rows]


def render_html(
    name: str,
    description: str,
    context: str,
    s: dict[str, Any],
    plots: list[tuple[str, bytes]],
    inputs: list[tuple[str, str]],
) -> str:
    """The page (see the module); ``plots`` are (title, PNG bytes)."""
    import jinja2

    from moesim.report.fields import number, scalars
    from moesim.report.verdict import run_verdict

    verdict, sentence = run_verdict(s)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    energy = s.get("energy") or {}
    return env.from_string(TEMPLATE).render(
        name=name,
        description=description,
        context=context,
        verdict=sentence,
        feasible=verdict.feasible,
        headline=_headline(s),
        notes=s.get("notes") or [],
        plots=[{"title": t, "data": base64.b64encode(b).decode()} for t, b in plots],
        energy=[(k, number(v)) for k, v in scalars(energy) if k not in ("power_source", "notes")],
        inputs=inputs,
        fields=[(k, number(v)) for k, v in scalars(s, skip=("energy",))],
    )
