"""Serving fidelity against a real engine: replay each measured online run (its arrival
times and request lengths, ``serving_request`` records of ``torch_serving``) through moesim
with an engine preset, and compare latency percentiles and throughput per run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moesim.calibrate.records import Record, of_kind
from moesim.calibrate.serving_fit import lengths_before, serving_scenario

METRICS = ("ttft_p50", "tpot_p50", "e2e_p50", "ttft_p90", "tpot_p90", "throughput")


def _latencies(
    arrival: np.ndarray, first: np.ndarray, finish: np.ndarray, out: np.ndarray
) -> dict[str, float]:
    """TTFT, TPOT (after the first token) and E2E percentiles, seconds, and output tokens
    per second over the run (first arrival to last finish), of finished requests."""
    done = np.isfinite(finish) & np.isfinite(first)
    a, f, e, n = arrival[done], first[done], finish[done], out[done]
    if not len(a):
        return dict.fromkeys(METRICS, float("nan"))
    ttft = f - a
    multi = n > 1
    tpot = (e[multi] - f[multi]) / (n[multi] - 1) if multi.any() else np.array([np.nan])
    e2e = e - a
    span = float(e.max() - arrival.min())
    late_tok_s, late_in_flight = _late_window(arrival, f, e, n)
    return {
        "late_tok_s": late_tok_s,
        "late_in_flight": late_in_flight,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "tpot_p50": float(np.percentile(tpot, 50)),
        "e2e_p50": float(np.percentile(e2e, 50)),
        "ttft_p90": float(np.percentile(ttft, 90)),
        "tpot_p90": float(np.percentile(tpot, 90)),
        "throughput": float(n.sum() / span) if span > 0 else float("nan"),
    }


LATE = 0.75
"""The late window: the last quarter of a run's arrivals."""


def _late_window(
    arrival: np.ndarray, first: np.ndarray, finish: np.ndarray, out: np.ndarray
) -> tuple[float, float]:
    """Output tokens per second the engine emits over the last quarter of the run's
    arrivals (each finished request's tokens spread evenly from its first to its last),
    and the mean number of requests in flight (arrived, unfinished) then: an engine keeps
    up where that rate reaches the offered one (arrival rate x output tokens) at a
    concurrency it can hold."""
    t0, t1 = float(arrival.min()), float(arrival.max())
    w0 = t0 + LATE * (t1 - t0)
    if t1 <= w0:
        return float("nan"), float("nan")
    overlap = np.clip(np.minimum(finish, t1) - np.maximum(first, w0), 0.0, None)
    spread = np.where(finish > first, finish - first, np.inf)
    tokens = (out - 1) * overlap / spread + ((first >= w0) & (first <= t1))
    times = np.linspace(w0, t1, 21)
    in_flight = [float(((arrival <= t) & ~(finish <= t)).sum()) for t in times]
    return float(tokens.sum() / (t1 - w0)), float(np.mean(in_flight))


def runs(records: Sequence[Record]) -> dict[str, list[Record]]:
    """The measured online runs: run id -> its requests, by arrival."""
    out: dict[str, list[Record]] = {}
    for r in of_kind(records, "serving_request"):
        out.setdefault(str(r["run"]), []).append(r)
    return {k: sorted(v, key=lambda r: float(r["arrival_s"])) for k, v in out.items()}


def replay(
    records: Sequence[Record],
    engine: str | dict[str, Any],
    seed: int = 0,
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per measured run (or per run in ``only``): its rate, and measured vs
    predicted figures. Each run is replayed with the prompt lengths of the file's earlier
    runs as the engine's ``warm_prompt_lengths`` (one engine process ran them in order)."""
    from moesim.api import run as run_scenario

    env = next(r for r in records if r.get("kind") == "env")
    device, model = str(env["gpu"]), str(env["model"])
    meta = {str(r["run"]): r for r in of_kind(records, "serving_run")}
    # the engine process ran the earlier runs' prompts first: their lengths are warm
    warm = lengths_before(records)
    base = {"preset": engine} if isinstance(engine, str) else dict(engine)
    rows = []
    for run_id, reqs in runs(records).items():
        if only is not None and run_id not in only:
            continue
        arrival = np.array([float(r["arrival_s"]) for r in reqs])
        t0 = float(arrival.min())
        measured = _latencies(
            arrival - t0,
            np.array([float(r["first_token_s"]) for r in reqs]) - t0,
            np.array([float(r["finish_s"]) for r in reqs]) - t0,
            np.array([int(r["output_tokens"]) for r in reqs]),
        )
        workload = {
            "kind": "serving",
            "duration_s": float(arrival.max() - t0) + 1e-3,
            "arrival": {
                "kind": "trace",
                "arrival_s": (arrival - t0).tolist(),
                "prompt_tokens": [int(r["prompt_tokens"]) for r in reqs],
                "output_tokens": [int(r["output_tokens"]) for r in reqs],
            },
        }
        eng = {**base, "warm_prompt_lengths": warm.get(run_id, [])}
        scenario = serving_scenario(device, model, eng, workload, seed)
        rec = run_scenario(scenario).records.requests
        predicted = _latencies(
            rec.arrival_s,
            rec.first_token_s,
            rec.finish_s,
            rec.output_tokens,
        )
        info = meta.get(run_id, {})
        rows.append(
            {
                "run": run_id,
                "rate_per_s": float(info.get("rate_per_s") or reqs[0].get("rate_per_s") or 0.0),
                "requests": len(reqs),
                "offered_tok_s": float(
                    (len(reqs) - 1)
                    / (arrival.max() - t0)
                    * np.mean([r["output_tokens"] for r in reqs])
                )
                if arrival.max() > t0
                else float("nan"),
                "prompt_range": info.get("prompt_range"),
                "measured": measured,
                "predicted": predicted,
            }
        )
    return sorted(rows, key=lambda r: (str(r["prompt_range"]), r["rate_per_s"], r["run"]))


def _cell(row: dict[str, Any], key: str) -> tuple[str, str, str]:
    m, p = row["measured"][key], row["predicted"][key]
    scale = 1.0 if key == "throughput" else 1e3
    err = p / m - 1 if m and np.isfinite(m) and np.isfinite(p) else float("nan")
    return f"{m * scale:.1f}", f"{p * scale:.1f}", f"{err:+.0%}"


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Measured vs predicted per run: TTFT/TPOT/E2E p50 (ms), TTFT/TPOT p90 (ms) and output
    tokens per second, each with the relative error."""
    head = ["run", "rate/s", "n", *(f"{k} meas/pred/err" for k in METRICS)]
    body = []
    for row in rows:
        cells = [" / ".join(_cell(row, k)) for k in METRICS]
        body.append([str(row["run"]), f"{row['rate_per_s']:g}", str(row["requests"]), *cells])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *body])


def keep_up_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Per run, over the last quarter of its arrivals: requests in flight and output tokens
    per second, measured and predicted, each against the offered rate."""
    head = ["run", "rate/s", "offered tok/s", "in flight meas/pred", "tok/s meas/pred"]
    body = []
    for row in rows:
        m, p, o = row["measured"], row["predicted"], row["offered_tok_s"]
        body.append(
            [
                str(row["run"]),
                f"{row['rate_per_s']:g}",
                f"{o:.0f}",
                f"{m['late_in_flight']:.0f} / {p['late_in_flight']:.0f}",
                f"{m['late_tok_s']:.0f} ({m['late_tok_s'] / o:.2f}) / "
                f"{p['late_tok_s']:.0f} ({p['late_tok_s'] / o:.2f})",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *body])
