"""A serving engine preset fitted on the engine's own measured iterations.

``moesim.calibrate.torch_serving`` times iterations through a real engine's code path:
prefills of one request (``serving_prefill``: time to the first token) and decode steps of
a batch of sequences at a context length (``serving_decode``). For each, moesim's device
model (the ``ideal`` engine on the measured device and model) predicts the kernels' time;
what the engine spends beyond that is its host-side cost, fitted by non-negative least
squares, relative to each measurement, as

    host = fixed + per_sequence x sequences + per_token x tokens

(``per_layer_us`` stays 0: with one model measured, a per-layer term cannot be told apart
from the fixed one; the fixed term then holds the per-layer dispatch of that model's
layers). The fit's error on the same measurements is recorded in the preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import nnls

from moesim.calibrate.records import Record, of_kind
from moesim.config.scenario import Scenario
from moesim.cost.attention import causal_keys
from moesim.cost.iteration import IterationCost

MODEL_OF = {"mixtral-8x7b": "mixtral-8x7b"}
"""Harness model names -> catalog presets."""


def serving_scenario(
    device: str,
    model: str,
    engine: str | dict[str, Any] = "ideal",
    workload: dict[str, Any] | None = None,
    seed: int = 0,
) -> Scenario:
    """One device serving ``model`` with ``engine`` (all experts local, dropless, the
    engine's launch mode): the scenario of a measured serving engine."""
    from moesim.calibrate.predict import cluster_for
    from moesim.loader import scenario_from_dict

    w = workload or {
        "kind": "serving",
        "duration_s": 1.0,
        "arrival": {
            "kind": "trace",
            "arrival_s": [0.0],
            "prompt_tokens": [1],
            "output_tokens": [1],
        },
    }
    data = {
        "name": "engine-fit",
        "seed": seed,
        "cluster": cluster_for(device, "torch"),
        "model": MODEL_OF.get(model, model),
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": 1, "ep": 1},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {**w, "engine": engine},
    }
    return scenario_from_dict(data, label=f"<{device} {model} {engine}>")


def _chunks(prompt: int, budget: int) -> list[int]:
    """A prompt's prefill chunks under a token budget (the last may be shorter)."""
    full, rest = divmod(prompt, budget)
    return [budget] * full + ([rest] if rest else [])


def predicted_device_s(
    cost: IterationCost, rec: Record, budget: int
) -> tuple[float, int, int, int]:
    """The device time of one measured record and its shape: (seconds, iterations,
    sequences sampled over them, tokens over them)."""
    if rec["kind"] == "serving_prefill":
        done, total = 0, 0.0
        chunks = _chunks(int(rec["prompt_tokens"]), budget)
        for i, n in enumerate(chunks):
            last = int(i == len(chunks) - 1)  # the first token is sampled after the last chunk
            total += cost.time([n], [float(causal_keys(n, done))], [done + n], [last]).total_s
            done += n
        return total, len(chunks), 1, int(rec["prompt_tokens"])
    b, c = int(rec["batch"]), int(rec["context"])
    t = cost.time([b], [float(b * c)], [b * c], [b]).total_s
    return t, 1, b, b


def measured_s(rec: Record) -> float:
    """The measured time of one record, seconds."""
    return float(rec["ttft_ms"] if rec["kind"] == "serving_prefill" else rec["step_ms"]) * 1e-3


def fit_engine(
    records: Sequence[Record], name: str, source: str, base: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The engine preset (catalog fields) fitted on the records, and one row per record
    (measured, device, fitted)."""
    env = next(r for r in records if r.get("kind") == "env")
    device, model = str(env["gpu"]), str(env["model"])
    scenario = serving_scenario(device, model, {"preset": "ideal", **base})
    from moesim.engine.layer_sim import simulated_layer_cost
    from moesim.system import build_system

    system = build_system(scenario)
    cost = IterationCost(system, simulated_layer_cost(system))
    budget = scenario.workload.scheduler.max_batch_tokens  # type: ignore[union-attr]
    rows: list[dict[str, Any]] = []
    design: list[list[float]] = []
    target: list[float] = []
    for rec in [*of_kind(records, "serving_prefill"), *of_kind(records, "serving_decode")]:
        dev, iters, seqs, toks = predicted_device_s(cost, rec, budget)
        meas = measured_s(rec)
        rows.append({"record": rec, "measured_s": meas, "device_s": dev})
        # relative least squares: each row scaled by 1 / measured
        design.append([iters / meas, seqs / meas, toks / meas])
        target.append((meas - dev) / meas)
    if not rows:
        raise ValueError("no serving_prefill or serving_decode records to fit an engine on")
    coef, _ = nnls(np.array(design), np.array(target))
    fixed_s, per_seq_s, per_tok_s = (float(x) for x in coef)
    errors = []
    for row, d in zip(rows, design):
        meas = float(row["measured_s"])
        host = (d[0] * fixed_s + d[1] * per_seq_s + d[2] * per_tok_s) * meas
        row["host_s"] = host
        row["predicted_s"] = float(row["device_s"]) + host
        errors.append(abs(row["predicted_s"] / meas - 1))
    errors.sort()
    preset = {
        **base,
        "source": source,
        "host": {
            "fixed_us": round(fixed_s * 1e6, 3),
            "per_layer_us": 0.0,
            "per_sequence_us": round(per_seq_s * 1e6, 4),
            "per_token_us": round(per_tok_s * 1e6, 4),
            "overlap": False,
        },
        "fit": {
            "samples": len(errors),
            "median_abs_error": round(errors[len(errors) // 2], 4),
            "worst_abs_error": round(errors[-1], 4),
        },
        "measured_on": [f"{scenario.cluster.accelerator.name}/{scenario.model.name}"],
    }
    del name
    return preset, rows


def fit_table(rows: list[dict[str, Any]]) -> str:
    """The fit's rows as a text table (measured vs the device model vs device + host)."""
    lines = [
        f"{'record':<34} {'measured ms':>12} {'device ms':>10} {'host ms':>9} {'pred ms':>9} "
        f"{'error':>7}"
    ]
    for row in rows:
        r = row["record"]
        what = (
            f"prefill {r['prompt_tokens']} tokens"
            if r["kind"] == "serving_prefill"
            else f"decode batch {r['batch']} ctx {r['context']}"
        )
        m, d, h, p = (row[k] * 1e3 for k in ("measured_s", "device_s", "host_s", "predicted_s"))
        err = p / m - 1 if m > 0 else math.nan
        lines.append(f"{what:<34} {m:>12.3f} {d:>10.3f} {h:>9.3f} {p:>9.3f} {err:>+7.1%}")
    return "\n".join(lines)
