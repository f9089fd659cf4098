"""Fitting an engine preset and replaying online runs, on records a known engine produced:
the fit recovers the known host cost, and the replay of its own runs matches."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest

from moesim.api import run
from moesim.calibrate.serving_fidelity import replay, table
from moesim.calibrate.serving_fit import fit_engine, predicted_s, serving_scenario
from moesim.cost.iteration import IterationCost
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.system import build_system

ENV = {"kind": "env", "gpu": "NVIDIA H200", "model": "mixtral-8x7b"}
KNOWN = {"fixed_us": 3000.0, "per_sequence_us": 40.0, "per_token_us": 2.0, "per_kv_token_us": 0.5}
ENGINE = {"preset": "ideal", "name": "known", "host": KNOWN}


@cache
def _grid() -> tuple[dict[str, Any], ...]:
    """Iteration records as the known engine would time them (device + its host cost)."""
    scenario = serving_scenario(ENV["gpu"], ENV["model"], ENGINE)
    system = build_system(scenario)
    cost = IterationCost(system, simulated_layer_cost(system))
    out: list[dict[str, Any]] = [ENV]
    for p in (16, 512, 4096, 12000):
        rec: dict[str, Any] = {"kind": "serving_prefill", "prompt_tokens": p}
        rec["ttft_ms"] = predicted_s(cost, rec, 8192)[0] * 1e3
        out.append(rec)
    for b in (1, 8, 64):
        for c in (128, 2048):
            rec = {"kind": "serving_decode", "batch": b, "context": c}
            rec["step_ms"] = predicted_s(cost, rec, 8192)[0] * 1e3
            out.append(rec)
    return tuple(out)


def test_fit_recovers_a_known_host_cost() -> None:
    """Host costs fitted on a known engine's iterations are that engine's, and the fit
    error on them is nil."""
    preset, rows = fit_engine(list(_grid()), "test", {})
    host = preset["host"]
    for key, value in KNOWN.items():
        assert host[key] == pytest.approx(value, rel=1e-3), (key, host)
    assert preset["fit"]["worst_abs_error"] < 1e-3
    assert preset["measured_on"] == ["h200-sxm/mixtral-8x7b"]
    assert len(rows) == len(_grid()) - 1


def _online(rate: float, n: int, seed: int) -> list[dict[str, Any]]:
    """serving_request records of one run of the known engine (moesim stands in for it)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate, n))
    prompt = rng.integers(100, 300, n)
    workload = {
        "kind": "serving",
        "duration_s": float(arrival[-1]) + 1e-3,
        "arrival": {
            "kind": "trace",
            "arrival_s": arrival.tolist(),
            "prompt_tokens": prompt.tolist(),
            "output_tokens": [16] * n,
        },
    }
    rec = run(serving_scenario(ENV["gpu"], ENV["model"], ENGINE, workload)).records.requests
    return [
        {
            "kind": "serving_request",
            "run": f"r{rate:g}",
            "rate_per_s": rate,
            "arrival_s": float(rec.arrival_s[i]) + 5.0,  # any clock origin
            "first_token_s": float(rec.first_token_s[i]) + 5.0,
            "finish_s": float(rec.finish_s[i]) + 5.0,
            "prompt_tokens": int(prompt[i]),
            "output_tokens": 16,
        }
        for i in range(n)
    ]


def test_replay_of_the_engines_own_runs_matches_and_ideal_is_faster() -> None:
    """Replaying a run with the engine that produced it predicts it exactly; the ideal
    engine (no host cost) predicts a shorter TPOT."""
    records = [ENV, *_online(4.0, 12, 1), *_online(20.0, 12, 2)]
    rows = replay(records, ENGINE)
    assert [r["rate_per_s"] for r in rows] == [4.0, 20.0]
    for row in rows:
        for key, m in row["measured"].items():
            assert row["predicted"][key] == pytest.approx(m, rel=1e-6), key
    ideal = replay(records, "ideal")
    assert all(i["predicted"]["tpot_p50"] < r["measured"]["tpot_p50"] for i, r in zip(ideal, rows))
    assert "tpot_p50" in table(rows) and table(rows, markdown=True).startswith("| run |")


def test_bad_measurement_files_are_one_line_errors(tmp_path) -> None:
    """A folder, a file without an env record, an env without the engine's configuration
    and an unknown device end in a one-line message, not a traceback."""
    import json

    from moesim.cli import main

    no_env = tmp_path / "no_env.jsonl"
    no_env.write_text('{"kind": "serving_decode"}\n')
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps(ENV) + "\n")
    tpu = tmp_path / "tpu.jsonl"
    request = {"kind": "serving_request", "run": "r", "arrival_s": 0.0, "first_token_s": 0.1}
    request |= {"finish_s": 0.2, "prompt_tokens": 8, "output_tokens": 2}
    tpu.write_text(json.dumps({**ENV, "gpu": "TPU v9"}) + "\n" + json.dumps(request) + "\n")
    cases = [
        (["fidelity", "--serving", str(tmp_path), "--engine", "ideal"], "not a measurement"),
        (["fidelity", "--serving", str(no_env), "--engine", "ideal"], "no env record"),
        (["fidelity", "--serving", str(bare), "--engine", "ideal"], "no online runs"),
        (["calibrate", "--from", str(bare), "--engine", "x"], "lacks the engine's"),
        (["fidelity", "--serving", str(tpu), "--engine", "ideal"], "no single-device cluster"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert words in str(err.value.code), (argv, err.value.code)


def test_online_iterations_of_a_pipelined_engine_pair_each_step_with_the_next_stamps() -> None:
    """With an output lag of one step (async batching) the tokens stamped at the end of
    step g+1 are those step g computed, and step g also re-runs the requests whose last
    token it stamped (the host had not yet seen them finish)."""
    from moesim.calibrate.serving_fit import online_iterations

    def req(prompt: int, start: float, stamps: list[float]) -> dict[str, Any]:
        return {
            "kind": "serving_request",
            "run": "a",
            "prompt_tokens": prompt,
            "start_s": start,
            "token_s": stamps,
        }

    # steps end at 0.1, 0.2, ...; A (100 tokens) is prefilled in the step ending 0.1, B (50)
    # in the one ending 0.3; each token is stamped one step after the step computing it
    records = [req(100, 0.0, [0.2, 0.3, 0.4]), req(50, 0.2, [0.4, 0.5])]
    steps = online_iterations(records, ["a"], lag=1)
    assert [(s["prompts"], s["contexts"]) for s in steps] == [([50], [102]), ([], [51, 103])]
    assert [s["step_ms"] for s in steps] == pytest.approx([100.0, 100.0])
    # read without the lag the same stamps pair each step with its own group
    plain = online_iterations(records, ["a"])
    assert [(s["prompts"], s["contexts"]) for s in plain] == [
        ([], [101]),
        ([50], [102]),
        ([], [51]),
    ]


def test_prompt_lengths_new_to_the_engine_process_are_counted_across_runs() -> None:
    """A step's ``new_lengths``: distinct prompt lengths no earlier request of the process
    had (runs in the file's order); ``lengths_before``: what a run's replay starts warm."""
    from moesim.calibrate.serving_fit import lengths_before, online_iterations

    def req(run: str, prompt: int, start: float, stamps: list[float]) -> dict[str, Any]:
        return {
            "kind": "serving_request",
            "run": run,
            "prompt_tokens": prompt,
            "start_s": start,
            "first_token_s": stamps[0],
            "token_s": stamps,
        }

    # run a: 100 and 50 prefilled in separate steps; run b: 100 again (warm) with 70 (new)
    records = [
        req("a", 100, 0.0, [0.1, 0.2, 0.3]),
        req("a", 50, 0.1, [0.2, 0.3]),
        req("b", 100, 0.0, [0.1, 0.2, 0.3]),
        req("b", 70, 0.1, [0.2, 0.3]),
        req("b", 70, 0.1, [0.2, 0.3]),
    ]
    steps = online_iterations(records, ["a", "b"])
    assert [(s["run"], s["prompts"], s["new_lengths"]) for s in steps] == [
        ("a", [50], 1),
        ("a", [], 0),
        ("b", [70, 70], 1),
        ("b", [], 0),
    ]
    assert lengths_before(records) == {"a": [], "b": [50, 100]}
