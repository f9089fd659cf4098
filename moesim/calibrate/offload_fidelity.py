"""moesim against the measured batch-1 offloaded decode (``torch_offload_decode`` records).

The scenario ``scenarios/mixtral-offload-decode-h200.yaml`` replays the decode trace the
measurement recorded (one request: a 1-token prompt and 160 output tokens, so its 160
iterations take the trace's first 160 tokens, as the measured decode did) through an LRU
expert cache of the measured slot counts. The measured runtime is an eager PyTorch loop at
batch 1, which is host-bound: the moesim serving iteration prices the attention blocks
at their device time, so the runtime's host time per decoder layer is an engine host cost
(``workload.engine.host.per_layer_us``, serial with the device). It is **fitted on the
``attention_only`` run alone** (the same decode without MoE part: measured ms/token minus
moesim's attention and head device time, per layer); every MoE run (``lru`` at each slot
count, the largest being the all-hit case) is held out.

Three record files of the same trace and harness, same H200 kind, 2026-12-03 (the third,
:data:`BRACKETED`: every slot count four times, each run right after an ``attention_only``
run of its own, a full warm-up run first; ``--host-from bracket|median``):
:data:`FIRST` (each slot count once, in increasing order: the 16-slot run came first after
pinning and its copies ran at about half rate) and :data:`MEASUREMENTS` (the default: each
slot count three times in a seeded shuffle, never the 16-slot case first, a copy-rate probe
before and after every run). A slot count measured several times is compared by the
median of its runs (every run is listed too); each run's per-miss cost is the
least-squares slope of its per-token times on its per-token misses.

    python3 -m moesim.calibrate.offload_fidelity [--file RECORDS] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
DIR = Path(__file__).resolve().parent.parent / "catalog/measurements/h200_offload_decode_2026-12-03"
MEASUREMENTS = DIR / "offload_decode_shuffled_2026-12-03.jsonl"
"""The re-measurement: every slot count three times, shuffled, copy-rate probes."""
BRACKETED = DIR / "offload_decode_bracketed_2026-12-03.jsonl"
"""The drift-controlled measurement (``--bracket --warmup-run``)."""
FIRST = DIR / "offload_decode.jsonl"
"""The first measurement (each slot count once, 16 slots first)."""
SCENARIO = ROOT / "scenarios/mixtral-offload-decode-h200.yaml"


@dataclass(frozen=True)
class Row:
    """One measured run against moesim."""

    slots: int
    mode: str
    measured_ms: float
    predicted_ms: float
    measured_hit: float | None
    predicted_hit: float | None
    run_index: int | None = None
    per_miss_ms: float | None = None
    probe_gb_s: tuple[float, float] | None = None

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


@dataclass(frozen=True)
class SlotSummary:
    """A slot count's runs: the median measured ms/token against moesim."""

    slots: int
    runs: int
    measured_ms: float
    predicted_ms: float
    min_error: float
    max_error: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


def replay_misses(path: Path, slots: int, layers: int, experts: int, tokens: int) -> list[int]:
    """Per-token misses of the harness's cache replaying the decode trace at ``path`` (for
    records written before the harness recorded them)."""
    from moesim.calibrate.torch_offload_decode import (
        LayerCache,
        hottest,
        load_trace,
        split_slots,
    )

    trace = load_trace(str(path))
    hot = hottest(trace, layers, experts)
    free, caches = list(range(slots)), []
    for j, n in enumerate(split_slots(slots, layers)):
        caches.append(LayerCache(n, free[:n], hot[j]))
        free = free[n:]
    out = []
    for t in range(tokens):
        keys = [sorted(trace.experts[t][j]) for j in range(layers)]
        out.append(sum(len(k) - len(caches[j].use(k)[0]) for j, k in enumerate(keys)))
    return out


def miss_slope(rec: dict[str, Any], misses: list[int] | None = None) -> float | None:
    """Least-squares slope of a run's per-token ms on its per-token misses (ms per miss);
    None without misses. ``misses``: when the record holds none."""
    ms, misses = rec.get("ms"), rec.get("misses", misses)
    if not ms or not misses or len(set(misses)) < 2:
        return None
    mx, my = statistics.fmean(misses), statistics.fmean(ms)
    sxy = sum((x - mx) * (y - my) for x, y in zip(misses, ms))
    sxx = sum((x - mx) ** 2 for x in misses)
    return sxy / sxx


def by_slots(rows: list[Row]) -> list[SlotSummary]:
    """Per slot count (ascending): the median of its runs' ms/token against moesim."""
    out = []
    for slots in sorted({r.slots for r in rows}):
        mine = [r for r in rows if r.slots == slots]
        errors = [r.error for r in mine]
        out.append(
            SlotSummary(
                slots,
                len(mine),
                statistics.median(r.measured_ms for r in mine),
                statistics.median(r.predicted_ms for r in mine),
                min(errors),
                max(errors),
            )
        )
    return out


def records(path: Path = MEASUREMENTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _scenario(slots: int, per_layer_us: float, tokens: int) -> Any:
    from moesim.loader import load_scenario

    return load_scenario(
        SCENARIO,
        [
            f"policies.offload.experts.cache_experts={slots}",
            f"workload.engine={{name: eager-decode, host: {{per_layer_us: {per_layer_us!r}}}}}",
            f"workload.arrival.output_tokens=[{tokens}]",
        ],
    )


def attention_device_ms(context: float, slots: int, tokens: int) -> float:
    """moesim's device time of one decode token without its MoE part: every layer's
    attention block and the head, ms."""
    from moesim.cost.iteration import IterationCost
    from moesim.engine.layer_sim import simulated_layer_cost
    from moesim.system import build_system

    s = _scenario(slots, 0.0, tokens)
    system = build_system(s)
    it = IterationCost(system, simulated_layer_cost(system)).time(
        [1], [context], [int(context)], [1]
    )
    return (it.attention_s + it.dense_s + it.head_s) * 1e3


def fit_host_us(recs: list[dict[str, Any]], run_index: int | None = None) -> float:
    """Host time per decoder layer, us, from the ``attention_only`` run: the session's
    (after the timed runs), or with ``run_index`` the bracket run just before that timed
    run (``--bracket`` records: the host time fitted next to each run)."""
    env = next(r for r in recs if r.get("kind") == "env")
    (att,) = [
        r
        for r in recs
        if r.get("mode") == "attention_only"
        and (r.get("run_index") == run_index if run_index is not None else not r.get("bracket"))
    ]
    context = env["context"] + (att["tokens"] - 1) / 2
    device = attention_device_ms(context, att["slots"], att["tokens"])
    return max(0.0, (att["ms_per_token"] - device) / env["layers"] * 1e3)


def predict(slots: int, per_layer_us: float, tokens: int) -> tuple[float, float]:
    """moesim's ms/token (the request's end-to-end time over its tokens) and HBM hit
    rate at ``slots`` expert slots."""
    import moesim

    res = moesim.run(_scenario(slots, per_layer_us, tokens))
    summary = res.summary
    e2e_ms = float(summary["e2e_ms"]["mean"])
    return e2e_ms / tokens, float(summary["offload"]["hit_rate"]["hbm"])


def compare(path: Path = MEASUREMENTS, host_from: str = "session") -> tuple[float, list[Row]]:
    """The fitted host time per layer and every held-out MoE run against moesim, in the
    order measured (moesim is deterministic: one prediction per slot count and host time).
    ``host_from``: ``session`` (the attention_only run after the timed runs), ``bracket``
    (each run with the host time fitted on its own bracket run just before it) or
    ``median`` (the median of the bracket runs' fits)."""
    recs = records(path)
    host = fit_host_us(recs)
    local = host_from == "bracket"
    if host_from == "median":
        host = statistics.median(
            fit_host_us(recs, r["run_index"])
            for r in recs
            if r.get("mode") == "attention_only" and r.get("bracket")
        )
    env = next(r for r in recs if r.get("kind") == "env")
    rows = []
    predicted: dict[tuple[int, int, float], tuple[float, float]] = {}
    for r in recs:
        if r.get("kind") != "offload_decode" or r["mode"] != "lru":
            continue
        h = fit_host_us(recs, r["run_index"]) if local else host
        key = (r["slots"], r["tokens"], h)
        if key not in predicted:
            predicted[key] = predict(r["slots"], h, r["tokens"])
        ms, hit = predicted[key]
        misses = None
        if "misses" not in r:
            misses = replay_misses(
                path.parent / env["trace"], r["slots"], env["layers"], env["experts"], r["tokens"]
            )
        probes = (
            (r["probe_before"]["gb_per_s"], r["probe_after"]["gb_per_s"])
            if "probe_before" in r
            else None
        )
        rows.append(
            Row(
                r["slots"],
                r["mode"],
                r["ms_per_token"],
                ms,
                r["hit_rate"],
                hit,
                r.get("run_index"),
                miss_slope(r, misses),
                probes,
            )
        )
    return host, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", type=Path, default=MEASUREMENTS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--host-from",
        choices=("session", "bracket", "median"),
        default="session",
        help="the host time's fit: the session's attention_only run, each run's own bracket"
        " run before it, or the median of the bracket runs (records made with --bracket)",
    )
    args = ap.parse_args(argv)
    host, rows = compare(args.file, args.host_from)
    summary = by_slots(rows)
    if args.json:
        print(
            json.dumps(
                {
                    "host_per_layer_us": host,
                    "rows": [r.__dict__ | {"error": r.error} for r in rows],
                    "slots": [s.__dict__ | {"error": s.error} for s in summary],
                }
            )
        )
        return 0
    how = {
        "session": "the session's",
        "bracket": "the session's (each run uses its own bracket's)",
        "median": "the median bracket",
    }
    print(f"host per decoder layer (fitted on {how[args.host_from]} attention_only): {host:.1f} us")
    print("\nevery run, in the order measured:")
    print(
        "| run | HBM slots | measured ms/token | moesim ms/token | error | ms per miss"
        " | copy probe before/after GB/s | measured hit rate | moesim hit rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        slope = "-" if r.per_miss_ms is None else f"{r.per_miss_ms:.2f}"
        probe = "-" if r.probe_gb_s is None else "{:.1f} / {:.1f}".format(*r.probe_gb_s)
        run = "-" if r.run_index is None else str(r.run_index)
        print(
            f"| {run} | {r.slots} | {r.measured_ms:.2f} | {r.predicted_ms:.2f} | "
            f"{r.error:+.1%} | {slope} | {probe} | {r.measured_hit:.4f} | "
            f"{r.predicted_hit:.4f} |"
        )
    print("\nper slot count (median of its runs):")
    print("| HBM slots | runs | measured ms/token | moesim ms/token | error | runs' errors |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(
            f"| {s.slots} | {s.runs} | {s.measured_ms:.2f} | {s.predicted_ms:.2f} | "
            f"{s.error:+.1%} | {s.min_error:+.1%} to {s.max_error:+.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
