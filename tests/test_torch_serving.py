"""The serving harness (moesim.calibrate.torch_serving): its pure-Python parts (arrivals,
lengths, plans, reading steps out of per-token timestamps, records) run everywhere; what
needs torch and transformers is skipped where they are not installed."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from moesim.calibrate import torch_serving as ts


def test_the_module_imports_without_torch() -> None:
    code = (
        "import sys, moesim.calibrate.torch_serving as m; "
        "print(sorted(k for k in ('torch', 'transformers', 'numpy') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_poisson_arrivals_are_seeded_start_at_zero_and_have_the_rate() -> None:
    a = ts.poisson_arrivals(random.Random(3), 2.0, 20000)
    b = ts.poisson_arrivals(random.Random(3), 2.0, 20000)
    assert a == b and a[0] == 0.0
    assert a == sorted(a)
    mean_gap = a[-1] / (len(a) - 1)
    assert mean_gap == pytest.approx(0.5, rel=0.03)
    assert ts.poisson_arrivals(random.Random(4), 2.0, 50) != a[:50]
    with pytest.raises(ValueError):
        ts.poisson_arrivals(random.Random(0), 0.0, 3)


def test_lengths_and_prompts_stay_in_range() -> None:
    rng = random.Random(1)
    lengths = ts.uniform_lengths(rng, 500, 700, 2000)
    assert min(lengths) >= 500 and max(lengths) <= 700
    assert min(lengths) < 520 and max(lengths) > 680  # both ends reached
    prompt = ts.random_prompt(rng, 5000, 32000)
    assert len(prompt) == 5000
    assert min(prompt) >= ts.FIRST_TOKEN_ID and max(prompt) < 32000
    assert len(set(prompt)) > 4000  # random ids: no two prompts share a 256-token block
    with pytest.raises(ValueError):
        ts.uniform_lengths(rng, 10, 5, 1)


def test_the_online_plan_has_the_rates_a_saturating_one_and_held_out_runs() -> None:
    plan = ts.online_plan(quick=False, seed=7)
    main = [s for s in plan if not s.held_out]
    held = [s for s in plan if s.held_out]
    assert [s.rate_per_s for s in main] == [0.5, 1.0, 2.0, 3.0, 4.0, 6.0]
    assert all(s.prompt_range == (500, 700) and s.output_tokens == 128 for s in main)
    assert len(held) == 2 and {s.rate_per_s for s in held}.isdisjoint(s.rate_per_s for s in main)
    assert all(s.prompt_range == (100, 300) and s.output_tokens == 256 for s in held)
    assert len({s.seed for s in plan}) == len(plan)
    assert len({s.run for s in plan}) == len(plan)
    assert all(6 <= s.requests <= 60 for s in plan)
    # each run's arrivals span at most ~15 s, so a run stays well under a minute
    assert all(s.requests / s.rate_per_s <= 15 for s in plan)
    quick = ts.online_plan(quick=True, seed=7)
    assert any(s.held_out for s in quick) and sum(s.requests for s in quick) <= 20


def test_a_run_workload_is_fixed_by_its_seed() -> None:
    spec = ts.RunSpec("r", 2.0, 11, 12, (500, 700), 128)
    w1, w2 = spec.workload(32000), spec.workload(32000)
    assert w1 == w2 and len(w1) == 12
    assert all(500 <= len(p) <= 700 for _, p in w1)
    other = ts.RunSpec("r", 2.0, 12, 12, (500, 700), 128).workload(32000)
    assert [a for a, _ in other] != [a for a, _ in w1]


def test_decode_points_that_do_not_fit_the_cache_are_named() -> None:
    fit = dict(num_blocks=1200, block_size=256, safety_margin=0.15, max_requests=1024)
    assert ts.decode_fit(128, 1024, 32, **fit) is None
    assert ts.decode_fit(16, 8192, 32, **fit) is None
    why = ts.decode_fit(256, 1024, 48, **fit)
    assert why is not None and "KV cache" in why
    assert "max_requests" in (ts.decode_fit(8, 128, 32, **{**fit, "max_requests": 4}) or "")
    # the engine's on-demand rule: (len + 1) // 256 + 1 blocks
    assert ts.blocks_for(1024, 256) == 5 and ts.blocks_for(1000, 256) == 4


def test_decode_output_tokens_leave_steady_steps_after_the_ramp() -> None:
    assert ts.decode_output_tokens(1, 128, 8192) == 32
    assert ts.decode_output_tokens(128, 1024, 8192) == 32  # 16-step ramp, 16 steady
    assert ts.decode_output_tokens(256, 1024, 8192) == 48
    assert ts.estimate_decode_s(16, 8192, 32, 8192) > ts.estimate_decode_s(16, 128, 32, 8192)


def test_the_decode_grid_leads_with_the_priority_points_and_covers_the_rest() -> None:
    grid = ts.decode_grid(quick=False)
    assert grid[: len(ts.DECODE_PRIORITY)] == list(ts.DECODE_PRIORITY)
    assert sorted(grid) == sorted((c, b) for c in ts.DECODE_CONTEXTS for b in ts.DECODE_BATCHES)
    assert len(ts.decode_grid(quick=True)) == 4


def _ramped_timestamps(batch: int, tokens: int, ramp: int, step: float, prefill: float):
    """Per-request token times of B requests admitted one per ramp step (each ramp step a
    slow prefill step), then decoding one token per ``step``; within a step the update
    loop takes 10 us a request."""
    out = []
    step_times = [prefill * (i + 1) for i in range(ramp)]
    while len(step_times) < ramp + tokens:
        step_times.append(step_times[-1] + step)
    for i in range(batch):
        first = min(i, ramp - 1)
        out.append([step_times[first + k] + 1e-5 * i for k in range(tokens)])
    return out


def test_steady_decode_reads_the_all_decode_window() -> None:
    stamps = _ramped_timestamps(batch=8, tokens=32, ramp=4, step=0.05, prefill=0.4)
    got = ts.steady_decode(stamps)
    assert got["step_ms"] == pytest.approx(50.0, abs=0.1)
    assert got["step_ms_p90"] == pytest.approx(50.0, abs=0.1)
    assert got["ramp_steps"] == 3
    assert got["steady_steps"] == 32 - 4  # from the last admission to the first finish
    steps = ts.step_clusters(stamps)
    assert sum(n for _, n in steps) == 8 * 32
    assert len(steps) == 4 + 32 - 1
    assert ts.steady_decode([])["step_ms"] is None


def test_mixed_step_finds_the_prefill_step_and_its_neighbours() -> None:
    step_times = [0.05 * i for i in range(1, 21)]
    step_times = [t if t < 0.5 else t + 0.2 for t in step_times]  # one 250 ms step at ~0.7 s
    decode = [[t + 1e-5 * j for t in step_times] for j in range(4)]
    t_prefill = step_times[9] + 5e-5
    got = ts.mixed_step(decode, t_prefill)
    assert got is not None
    assert got["step_ms"] == pytest.approx(250.0, abs=0.1)
    assert got["decode_step_ms"] == pytest.approx(50.0, abs=0.1)
    assert got["decoders_seen"] == 4 and got["decode_token_index"] == 9
    assert ts.mixed_step(decode, 99.0) is None


def test_request_times_and_run_summary() -> None:
    rel = ts.request_times(10.5, 10.6, [11.0, 11.1, 11.2], t0=10.0)
    assert rel == {"arrival_s": 0.5, "start_s": 0.6, "first_token_s": 1.0, "finish_s": 1.2}
    assert ts.request_times(10.5, -1, [], t0=10.0)["start_s"] is None
    reqs = [
        {**rel, "output_tokens": 3, "complete": True},
        {
            **ts.request_times(11.0, 11.0, [11.5, 11.7, 12.1], 10.0),
            "output_tokens": 3,
            "complete": True,
        },
        {"arrival_s": None, "output_tokens": 0, "complete": False},
    ]
    got = ts.summarize_requests(reqs)
    assert got["completed"] == 2
    assert got["ttft_p50_s"] == pytest.approx(statistics.median([0.5, 0.5]))
    assert got["tpot_p50_ms"] == pytest.approx(statistics.median([100.0, 300.0]))
    assert got["e2e_p50_s"] == pytest.approx(statistics.median([0.7, 1.1]))
    assert got["output_tok_per_s"] == pytest.approx(6 / (2.1 - 0.5))


def test_the_sink_writes_json_lines_as_it_goes(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        sink = ts.Sink(fh)
        sink.write(
            "env",
            shape=(1, 2),
            bad=float("nan"),
            obj=object(),
            plan=[ts.RunSpec("r", 1.0, 1, 2, (3, 4), 5)],
        )
        assert len(path.read_text().splitlines()) == 1  # flushed before the file closes
        sink.write("serving_prefill", prompt_tokens=16, ttft_ms=12.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["env", "serving_prefill"]
    assert lines[0]["shape"] == [1, 2] and lines[0]["bad"] is None
    assert isinstance(lines[0]["obj"], str)
    assert lines[0]["plan"][0]["prompt_range"] == [3, 4]


def test_the_model_config_is_mixtral_8x7b() -> None:
    cfg = ts.model_config(quick=False)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        4096,
        14336,
        32,
    )
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert cfg["rope_parameters"]["rope_theta"] == 1e6 and cfg["sliding_window"] is None
    small = ts.model_config(quick=True)
    assert small["num_hidden_layers"] == 2 and small["vocab_size"] == 32000
    assert ts.MIXTRAL_8X7B["num_hidden_layers"] == 32  # not changed by the quick copy


def _cuda_present() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_cuda_present(), reason="with a GPU the CLI would run the real harness")
def test_without_a_gpu_the_cli_writes_an_error_record(tmp_path: Path) -> None:
    out = tmp_path / "serving.jsonl"
    assert ts.main(["--out", str(out), "--quick"]) == 2
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["kind"] == "error" and rec["section"] == "import"


def test_the_config_builds_a_transformers_mixtral_config() -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(**ts.model_config(quick=True))
    assert config.num_local_experts == 8 and config.num_experts_per_tok == 2
    assert config.sliding_window is None


def test_the_saturation_plan_brackets_the_rate_and_repeats_the_fitted_shapes() -> None:
    """40 s of arrivals at four rates (held out), then the default plan's fitted shapes at
    1, 3 and 6 /s with new seeds (the host's own speed in the same process)."""
    plan = ts.online_plan(quick=False, seed=7, plan="saturation")
    sat = [s for s in plan if s.held_out]
    same_host = [s for s in plan if not s.held_out]
    assert sorted(s.rate_per_s for s in sat) == [2.0, 3.0, 4.0, 5.5]
    assert all(s.requests == round(40 * s.rate_per_s) for s in sat)
    assert [s.rate_per_s for s in same_host] == [1.0, 3.0, 6.0]
    default = {s.rate_per_s: s for s in ts.online_plan(quick=False, seed=7)}
    for s in same_host:  # the fitted shapes, other seeds
        d = default[s.rate_per_s]
        assert (s.requests, s.prompt_range, s.output_tokens) == (
            d.requests,
            d.prompt_range,
            d.output_tokens,
        )
        assert s.seed != d.seed
    assert len({s.seed for s in plan}) == len(plan)
    # the whole plan's time estimate fits one device command
    assert sum(ts.estimate_run_s(s) for s in plan) < 420
