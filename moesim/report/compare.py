"""Side-by-side comparison of two run summaries (``moesim compare A.yaml B.yaml``)."""

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
