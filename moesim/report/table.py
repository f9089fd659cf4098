"""Human-readable rendering of a summary for the terminal."""

from __future__ import annotations

from typing import Any


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def layer_table(summary: dict[str, Any]) -> str:
    """A compact, aligned text table of a layer summary."""
    s = summary
    b = s["breakdown_ms"]
    load = s["expert_load"]
    dev = s["device_time_ms"]
    rows = [
        ("scenario", f"{s['scenario']}  (seed {s['seed']})"),
        ("model / cluster", f"{s['model']} on {s['cluster']} ({s['devices']} devices)"),
        ("layer time", f"{s['time_ms']:.4f} ms"),
        ("  critical path", "  ".join(f"{k} {v:.4f}" for k, v in b.items()) + "  (ms)"),
        ("tokens x top_k", f"{s['tokens']} x {s['top_k']} = {s['slots']} slots"),
        (
            "dropped",
            f"{s['dropped_tokens']} slots ({100 * s['dropped_fraction']:.2f}%), "
            f"{s['fully_dropped_tokens']} tokens lost every choice, "
            f"{s['rerouted_slots']} rerouted",
        ),
        ("capacity / expert", str(s["capacity_per_expert"] or "unlimited")),
        (
            "expert load",
            f"min {min(load)}  max {max(load)}  (device max/mean {s['load_imbalance']:.3f})",
        ),
        ("device busy", f"min {min(dev):.4f}  max {max(dev):.4f} ms"),
        ("all-to-all", _fmt_bytes(s["a2a_bytes"]) + " between devices"),
    ]
    if s.get("busiest_link"):
        bl = s["busiest_link"]
        rows.append(
            (
                "busiest link",
                f"{bl['link']}  {_fmt_bytes(bl['bytes'])}  "
                f"{100 * bl['utilization']:.1f}% of {bl['bandwidth_gbps']:.0f} GB/s",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
