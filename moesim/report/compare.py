"""Side-by-side comparison of two runs (``moesim compare A.yaml B.yaml``): what differs in
the inputs first (the resolved scenarios' diff), warnings where a side-by-side reading
misleads (different global batches, PUEs, loads), outputs normalised per token, per device
and per request, and every raw summary field behind ``--all``."""

from __future__ import annotations

from typing import Any


def _flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested scalars as ``a.b`` keys; lists of numbers are summarised by max and sum."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            nums = [v for v in value if isinstance(v, int | float)]
            if nums and len(nums) == len(value):
                out[f"{name}.max"] = max(nums)
                out[f"{name}.sum"] = sum(nums)
        else:
            out[name] = value
    return out


#: identifiers, not quantities: shown, never differenced
NOT_QUANTITIES = frozenset({"seed"})
#: summarised lists whose sum means nothing (times that overlap, per-device finish times)
NO_SUM = ("device_finish_ms", "device_time_ms", "stage_ms")
CELL_WIDTH = 40
"""Longer text cells (sources, notes) are shortened in the table; --json has them whole."""


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(field, A, B, difference) for every field of either summary, in A's order."""
    fa, fb = _flatten(a), _flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    keys = [k for k in keys if not (k.endswith(".sum") and k.startswith(NO_SUM))]
    rows = []
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        diff = ""
        if k in NOT_QUANTITIES:
            diff = "" if va == vb else "differs"
        elif (
            isinstance(va, int | float) and isinstance(vb, int | float) and not isinstance(va, bool)
        ):
            delta = vb - va
            diff = f"{delta:+.6g}"
            if va:
                diff += f" ({100 * delta / abs(va):+.1f}%)"
        elif va != vb:
            diff = "differs"
        rows.append((k, va, vb, diff))
    return rows


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """A text table of two summaries with B - A differences."""
    rows = compare_rows(a, b)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        text = "-" if v is None else str(v)
        return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 3] + "..."

    head = ("field", name_a, name_b, "B - A")
    table = [head] + [(k, cell(va), cell(vb), d) for k, va, vb, d in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def scenario_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The inputs that differ between two resolved scenarios (``model_dump(mode="json")``):
    ``(field, A, B)`` per leaf, lists compared whole; the name and description left out."""

    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out

    fa, fb = leaves(a), leaves(b)
    skip = {"name", "description"}
    keys = list(fa) + [k for k in fb if k not in fa]
    return [(k, fa.get(k), fb.get(k)) for k in keys if k not in skip and fa.get(k) != fb.get(k)]


def _get(s: dict[str, Any], path: str) -> Any:
    node: Any = s
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _div(x: Any, y: Any) -> float | None:
    ok = isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool)
    return float(x) / float(y) if ok and y else None


def normalised(s: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Outputs per token, per device and per request, so runs of different sizes compare."""
    n = s.get("devices") or 1
    e = s.get("energy") or {}
    kind = s.get("workload")
    rows: list[tuple[str, float | None]] = []
    if kind == "serving":
        steady = s.get("steady_state") or {}
        rows += [
            ("output tokens/s (steady state)", steady.get("throughput_tokens_per_s")),
            ("output tokens/s per device", _div(steady.get("throughput_tokens_per_s"), n)),
            ("keeps up (steady generated / due)", steady.get("keep_up")),
            ("TTFT p99 per request (ms)", _get(s, "ttft_ms.p99")),
            ("TPOT p99 per request (ms)", _get(s, "tpot_ms.p99")),
            ("E2E p50 per request (ms)", _get(s, "e2e_ms.p50")),
            ("SLO attainment (both)", _get(s, "slo_attainment.both")),
            ("energy per output token, steady state (J)", e.get("steady_energy_per_token_j")),
            ("energy per output token, whole run (J)", e.get("energy_per_token_j")),
            ("energy per request, whole run (J)", e.get("energy_per_request_j")),
        ]
    elif kind == "training":
        rows += [
            ("tokens per step (global batch)", s.get("tokens_per_step")),
            ("tokens/s", s.get("tokens_per_s")),
            ("tokens/s per device", _div(s.get("tokens_per_s"), n)),
            (
                "step time per 1k tokens (ms)",
                _div(s.get("step_time_ms"), (s.get("tokens_per_step") or 0) / 1e3),
            ),
            ("MFU", s.get("mfu")),
            ("peak memory per device (GiB)", _get(s, "memory_gib.total")),
            ("energy per trained token (J)", e.get("energy_per_token_j")),
        ]
    else:
        tokens = s.get("tokens")
        rows += [
            ("layer time per 1k tokens (ms)", _div(s.get("time_ms"), (tokens or 0) / 1e3)),
            ("tokens/s per device", _div(tokens, (s.get("time_ms") or 0) / 1e3 * n)),
            ("dropped share of slots", s.get("dropped_fraction")),
            ("load imbalance (device max/mean)", s.get("load_imbalance")),
            ("energy per token (J)", e.get("energy_per_token_j")),
        ]
    rows += [
        ("devices", n),
        (
            "device energy share of the total",
            _div((e.get("energy_j_by_component") or {}).get("devices"), e.get("energy_j")),
        ),
    ]
    return rows


def warnings(
    sa: dict[str, Any], sb: dict[str, Any], ra: dict[str, Any], rb: dict[str, Any]
) -> list[str]:
    """What makes a side-by-side reading misleading: different global batches (training),
    facility inputs (PUE, carbon intensity), workload kinds."""
    out = []
    if sa.get("workload") != sb.get("workload"):
        out.append(f"different workloads ({sa.get('workload')} vs {sb.get('workload')})")
    ta, tb = sa.get("tokens_per_step"), sb.get("tokens_per_step")
    if ta is not None and tb is not None and ta != tb:
        out.append(
            f"the runs train different global batches ({ta} vs {tb} tokens per step): a step "
            "time is not comparable; compare tokens/s"
        )
    pa, pb = _get(ra, "energy.pue"), _get(rb, "energy.pue")
    if pa != pb:
        out.append(
            f"different PUEs ({pa} vs {pb}): facility energy differs by that ratio alone; "
            "compare the devices' energy"
        )
    ca, cb = (
        _get(ra, "energy.carbon_intensity_g_per_kwh"),
        _get(rb, "energy.carbon_intensity_g_per_kwh"),
    )
    if ca != cb:
        out.append(f"different carbon intensities ({ca} vs {cb} g/kWh)")
    if sa.get("workload") == "serving" and (
        sa.get("offered_requests_per_s") != sb.get("offered_requests_per_s")
    ):
        out.append("different offered loads: compare per-token and per-request figures")
    return out


def comparison(
    sa: dict[str, Any],
    sb: dict[str, Any],
    ra: dict[str, Any],
    rb: dict[str, Any],
    name_a: str,
    name_b: str,
    raw: bool = False,
) -> str:
    """``moesim compare``'s text: warnings, the inputs that differ, normalised outputs,
    and with ``raw`` every summary field."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        text = "-" if v is None else str(v)
        return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 3] + "..."

    def table(rows: list[tuple[str, str, str, str]]) -> list[str]:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    out = [f"A: {name_a}", f"B: {name_b}", ""]
    out += [f"WARNING: {w}" for w in warnings(sa, sb, ra, rb)]
    diff = scenario_diff(ra, rb)
    out += ["", f"inputs that differ ({len(diff)}):"]
    out += (
        table([("field", "A", "B", "")] + [(k, cell(a), cell(b), "") for k, a, b in diff])
        if diff
        else ["  none: the same resolved scenario"]
    )
    na, nb = dict(normalised(sa)), dict(normalised(sb))
    rows = [("figure", "A", "B", "B / A")]
    for k in list(na) + [k for k in nb if k not in na]:
        a, b = na.get(k), nb.get(k)
        ratio = _div(b, a)
        rows.append((k, cell(a), cell(b), "" if ratio is None else f"{ratio:.3g}x"))
    out += ["", "outputs, normalised:", *table(rows)]
    if raw:
        out += ["", "every summary field:", compare_table(sa, sb, "A", "B")]
    else:
        out += ["", "(--all: every summary field side by side)"]
    return "\n".join(out)
