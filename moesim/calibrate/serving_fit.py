"""A serving engine preset fitted on the engine's own measured iterations.

``moesim.calibrate.torch_serving`` times iterations through a real engine's code path:
prefills of one request (``serving_prefill``: time to the first token) and decode steps of
a batch of sequences at a context length (``serving_decode``). For each, moesim's device
model (the ``ideal`` engine on the measured device and model) predicts the kernels' time;
what the engine spends beyond that is its host-side cost, fitted by non-negative least
squares, relative to each measurement, as

    host = fixed + per_sequence x sequences + per_token x tokens + per_kv_token x kv tokens

(``per_layer_us`` stays 0: with one model measured, a per-layer term cannot be told apart
from the fixed one; the fixed term then holds the per-layer dispatch of that model's
layers; except for an engine that replays decode steps as CUDA graphs, ``graph_decode``,
where only the eager steps, those with prompt tokens, pay it, and each prompt of such a
step adds its own dispatch, ``per_prompt_layer_us`` x layers: that engine, the lean one,
runs attention and cache writes per prompt, where transformers packs them into one
kernel). The fit's error on the same measurements is recorded in the preset.
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

    try:
        cluster = cluster_for(device, "torch")
    except ValueError as exc:
        raise SystemExit(f"moesim: measured on {device!r}: {exc}") from None
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
        "cluster": cluster,
        "model": model,
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


def predicted_s(cost: IterationCost, rec: Record, budget: int) -> tuple[float, int, int, int, int]:
    """The iteration cost model's time for one measured record (the device alone when
    ``cost``'s engine has no host cost, as in a fit) and its shape: (seconds, iterations,
    sequences sampled over them, tokens over them, KV tokens read over them)."""
    if rec["kind"] == "serving_prefill":
        done, total, kv = 0, 0.0, 0
        chunks = _chunks(int(rec["prompt_tokens"]), budget)
        for i, n in enumerate(chunks):
            last = int(i == len(chunks) - 1)  # the first token is sampled after the last chunk
            total += cost.time([n], [float(causal_keys(n, done))], [done + n], [last]).total_s
            done += n
            kv += done
        return total, len(chunks), 1, int(rec["prompt_tokens"]), kv
    if rec["kind"] == "serving_step":
        prompts, contexts = list(rec["prompts"]), list(rec["contexts"])
        tokens = sum(prompts) + len(contexts)
        keys = sum(causal_keys(p, 0) for p in prompts) + sum(contexts)
        kv = sum(prompts) + sum(contexts)
        seqs = len(prompts) + len(contexts)
        return cost.time([tokens], [float(keys)], [kv], [seqs]).total_s, 1, seqs, tokens, kv
    b, c = int(rec["batch"]), int(rec["context"])
    t = cost.time([b], [float(b * c)], [b * c], [b]).total_s
    return t, 1, b, b, b * c


STEP_GAP_S = 2e-3
"""Token timestamps closer than this belong to one engine iteration (an iteration stamps
its tokens one request after another on the host, microseconds apart; iterations of this
engine take tens of milliseconds)."""


IDLE_S = 5e-3
"""A prompt scheduled this long after the previous step's end found the engine idle."""


def online_iterations(
    records: Sequence[Record], run_ids: Sequence[str], lag: int = 0
) -> list[Record]:
    """The engine iterations of measured online runs, rebuilt from every request's token
    timestamps: an iteration ends where tokens were stamped together; the requests whose
    first token it stamped had their prompts prefilled in it (whole: the prompts here are
    shorter than the token budget), the others decoded one token at their context. The
    first iteration after an idle gap is left out (its start is not known).

    ``lag`` (an engine's ``output_lag_iterations``): a step's tokens are stamped ``lag``
    iterations after it, so the tokens of the stamp group ``lag`` groups later are the
    ones it computed; with ``lag`` 1 (transformers' async batching) a step also re-runs
    the requests whose last token was stamped at its own end (scheduled again before the
    host learned they had finished), each one decode at its full length."""
    first = first_of_length(records)
    out: list[Record] = []
    for run in run_ids:
        reqs = [r for r in of_kind(records, "serving_request") if r["run"] == run]
        stamps = sorted(
            (float(t), i, k)
            for i, r in enumerate(reqs)
            if r.get("timestamps_complete", True)
            for k, t in enumerate(r.get("token_s") or [])
        )
        groups: list[list[tuple[float, int, int]]] = []
        for stamp in stamps:
            if groups and stamp[0] - groups[-1][-1][0] < STEP_GAP_S:
                groups[-1].append(stamp)
            else:
                groups.append([stamp])
        for g in range(1, len(groups) - lag):
            start, end = groups[g - 1][-1][0], groups[g][-1][0]
            computed = groups[g + lag]
            # a prompt first scheduled well after the previous step ended arrived into an
            # idle engine: this step began later than that end
            if any(float(reqs[i]["start_s"]) > start + IDLE_S for _, i, k in computed if k == 0):
                continue
            # an idle gap between this step and the one whose tokens it stamps
            if lag and computed[-1][0] - groups[g + lag - 1][-1][0] > 2 * (end - start) + IDLE_S:
                continue
            prompts = [int(reqs[i]["prompt_tokens"]) for _, i, k in computed if k == 0]
            new = {
                int(reqs[i]["prompt_tokens"])
                for _, i, k in computed
                if k == 0 and (run, i) in first
            }
            contexts = [int(reqs[i]["prompt_tokens"]) + k for _, i, k in computed if k > 0]
            if lag:
                contexts += [
                    int(reqs[i]["prompt_tokens"]) + k + 1
                    for _, i, k in groups[g]
                    if k + 1 == len(reqs[i]["token_s"])
                ]
            out.append(
                {
                    "kind": "serving_step",
                    "run": run,
                    "step_ms": (end - start) * 1e3,
                    "prompts": prompts,
                    "new_lengths": len(new),
                    "contexts": contexts,
                }
            )
    return out


def first_of_length(records: Sequence[Record]) -> set[tuple[str, int]]:
    """(run, i) of each request (the i-th of its run in the file) that was the first of
    its prompt length in the engine process (runs in the file's order, requests by first
    token): the engine set up its attention for that shape then. The harness's warm-up
    prompts are not recorded and count as unseen."""
    order: dict[str, list[tuple[int, Record]]] = {}
    for r in of_kind(records, "serving_request"):
        mine = order.setdefault(str(r["run"]), [])
        mine.append((len(mine), r))
    seen: set[int] = set()
    first: set[tuple[str, int]] = set()
    for run, reqs in order.items():
        done = [(i, r) for i, r in reqs if r.get("first_token_s") is not None]
        for i, r in sorted(done, key=lambda x: float(x[1]["first_token_s"])):
            n = int(r["prompt_tokens"])
            if n not in seen:
                seen.add(n)
                first.add((run, i))
    return first


def lengths_before(records: Sequence[Record]) -> dict[str, list[int]]:
    """Per run: the prompt lengths the engine process ran in the runs before it (in the
    file's order): the run's ``warm_prompt_lengths``."""
    out: dict[str, list[int]] = {}
    seen: set[int] = set()
    for r in of_kind(records, "serving_request"):
        run = str(r["run"])
        if run not in out:
            out[run] = sorted(seen)
        if r.get("first_token_s") is not None:
            seen.add(int(r["prompt_tokens"]))
    return out


def measured_s(rec: Record) -> float:
    """The measured time of one record, seconds."""
    return float(rec["ttft_ms"] if rec["kind"] == "serving_prefill" else rec["step_ms"]) * 1e-3


def fit_engine(
    records: Sequence[Record],
    source: str,
    base: dict[str, Any],
    fit_runs: Sequence[str] = (),
    weight: str = "relative",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The engine preset (catalog fields) fitted on the records' iterations (and on the
    iterations of the online runs ``fit_runs``), and one row per iteration (measured,
    device, fitted). ``weight``: minimise each iteration's relative error, or its error in
    seconds (``time``: an iteration weighs by its length, as it does in a request's
    latency, so a few long eager steps are not outvoted by many short graphed ones)."""
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
    measured = [
        *of_kind(records, "serving_prefill"),
        *of_kind(records, "serving_decode"),
        *online_iterations(records, fit_runs, int(base.get("output_lag_iterations", 0))),
    ]
    overlap = bool(base.get("host", {}).get("overlap"))
    # graphed decode steps: the per-layer dispatch is paid by eager steps alone, so it can be
    # told apart from the fixed cost (else it stays 0: one model cannot separate the two)
    graph_decode = bool(base.get("host", {}).get("graph_decode"))
    layers = scenario.model.layers
    for rec in [r for r in measured if "ttft_ms" in r or "step_ms" in r]:
        dev, iters, seqs, toks, kv = predicted_s(cost, rec, budget)
        meas = measured_s(rec)
        rows.append({"record": rec, "measured_s": meas, "device_s": dev})
        # relative least squares: each row scaled by 1 / measured; where host work overlaps
        # the device's, the host loop is the step (the device hides under it; rows where
        # the device is longer are then predicted by max(host, device))
        eager = iters if rec["kind"] == "serving_prefill" else int(bool(rec.get("prompts")))
        eager_layers = layers * eager if graph_decode else 0
        # one prompt per prefill chunk; a step's prompts each dispatch their own kernels
        prompts = iters if rec["kind"] == "serving_prefill" else len(rec.get("prompts", ()))
        prompt_layers = layers * prompts if graph_decode else 0
        new_lengths = int(rec.get("new_lengths", 0)) if graph_decode else 0
        design.append(
            [
                iters / meas,
                seqs / meas,
                toks / meas,
                kv / meas,
                eager_layers / meas,
                prompt_layers / meas,
                new_lengths / meas,
            ]
        )
        target.append(1.0 if overlap else (meas - dev) / meas)
    if not rows:
        raise ValueError("no serving_prefill or serving_decode records to fit an engine on")
    a, b = np.array(design), np.array(target)
    if weight == "time":  # rows back from relative to seconds
        scale = np.array([float(r["measured_s"]) for r in rows])
        a, b = a * scale[:, None], b * scale
    elif weight != "relative":
        raise ValueError(f"fit weight must be 'relative' or 'time', got {weight!r}")
    if not graph_decode:  # no per-prompt column: the fit as before, to the last bit
        a = a[:, :5]
    coef, _ = nnls(a, b)
    fixed_s, per_seq_s, per_tok_s, per_kv_s, per_layer_s = (float(x) for x in coef[:5])
    per_prompt_s = float(coef[5]) if len(coef) > 5 else 0.0
    first_length_s = float(coef[6]) if len(coef) > 6 else 0.0
    errors = []
    for row, d in zip(rows, design):
        meas = float(row["measured_s"])
        host = (
            d[0] * fixed_s
            + d[1] * per_seq_s
            + d[2] * per_tok_s
            + d[3] * per_kv_s
            + d[4] * per_layer_s
            + d[5] * per_prompt_s
            + d[6] * first_length_s
        ) * meas
        row["host_s"] = host
        dev = float(row["device_s"])
        row["predicted_s"] = max(dev, host) if overlap else dev + host
        errors.append(abs(row["predicted_s"] / meas - 1))
    errors.sort()
    preset = {
        **base,
        "source": source,
        "host": {
            **base.get("host", {}),
            "fixed_us": round(fixed_s * 1e6, 3),
            "per_layer_us": round(per_layer_s * 1e6, 4),
            "per_sequence_us": round(per_seq_s * 1e6, 4),
            "per_token_us": round(per_tok_s * 1e6, 4),
            "per_kv_token_us": round(per_kv_s * 1e6, 5),
            **(
                {
                    "per_prompt_layer_us": round(per_prompt_s * 1e6, 4),
                    "first_prompt_length_us": round(first_length_s * 1e6, 3),
                }
                if graph_decode
                else {}
            ),
        },
        "fit": {
            "samples": len(errors),
            "median_abs_error": round(errors[len(errors) // 2], 4),
            "worst_abs_error": round(errors[-1], 4),
        },
        "measured_on": [f"{scenario.cluster.accelerator.name}/{scenario.model.name}"],
    }
    return preset, rows


def fit_table(rows: list[dict[str, Any]]) -> str:
    """The fit's rows as a text table (measured vs the device model vs device + host)."""
    lines = [
        f"{'record':<34} {'measured ms':>12} {'device ms':>10} {'host ms':>9} {'pred ms':>9} "
        f"{'error':>7}"
    ]
    for row in rows:
        r = row["record"]
        if r["kind"] == "serving_step":
            what = f"{r['run']} step: {len(r['prompts'])} prompts, {len(r['contexts'])} decodes"
        elif r["kind"] == "serving_prefill":
            what = f"prefill {r['prompt_tokens']} tokens"
        else:
            what = f"decode batch {r['batch']} ctx {r['context']}"
        m, d, h, p = (row[k] * 1e3 for k in ("measured_s", "device_s", "host_s", "predicted_s"))
        err = p / m - 1 if m > 0 else math.nan
        lines.append(f"{what:<34} {m:>12.3f} {d:>10.3f} {h:>9.3f} {p:>9.3f} {err:>+7.1%}")
    return "\n".join(lines)
