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

    python3 -m moesim.calibrate.offload_fidelity [--file RECORDS] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
MEASUREMENTS = (
    Path(__file__).resolve().parent.parent
    / "catalog/measurements/h200_offload_decode_2026-12-03/offload_decode.jsonl"
)
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

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


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


def fit_host_us(recs: list[dict[str, Any]]) -> float:
    """Host time per decoder layer, us, from the ``attention_only`` run."""
    env = next(r for r in recs if r.get("kind") == "env")
    (att,) = [r for r in recs if r.get("mode") == "attention_only"]
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


def compare(path: Path = MEASUREMENTS) -> tuple[float, list[Row]]:
    """The fitted host time per layer and every held-out MoE run against moesim."""
    recs = records(path)
    host = fit_host_us(recs)
    rows = []
    for r in recs:
        if r.get("kind") != "offload_decode" or r["mode"] != "lru":
            continue
        ms, hit = predict(r["slots"], host, r["tokens"])
        rows.append(Row(r["slots"], r["mode"], r["ms_per_token"], ms, r["hit_rate"], hit))
    return host, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", type=Path, default=MEASUREMENTS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    host, rows = compare(args.file)
    if args.json:
        print(
            json.dumps(
                {"host_per_layer_us": host, "rows": [r.__dict__ | {"error": r.error} for r in rows]}
            )
        )
        return 0
    print(f"host per decoder layer (fitted on attention_only): {host:.1f} us")
    print(
        "| HBM slots | measured ms/token | moesim ms/token | error | measured hit rate"
        " | moesim hit rate |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.slots} | {r.measured_ms:.2f} | {r.predicted_ms:.2f} | {r.error:+.1%} | "
            f"{r.measured_hit:.4f} | {r.predicted_hit:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
