"""The router-logit model and its fit (issue 12): ``moesim routing fit`` reproduces a
synthetic trace's distinct-experts-touched curve within 10%; token correlation gives
temporal locality; a logits scenario runs deterministically; ``moesim routing stats``."""

from __future__ import annotations

import json

import numpy as np

import moesim
from moesim.cli import main
from moesim.config.routing import LogitsRouting
from moesim.loader import load_scenario
from moesim.routing.logits import LogitsStream, distinct_curve, fit_logits
from moesim.routing.stats import lru_hit_curve, reuse_distances

E, K, L = 64, 4, 4


def skewed(seed: int, rho: float = 0.0, noise: float = 1.5) -> LogitsRouting:
    bias = np.random.default_rng(seed).normal(0.0, 1.5, (L, E))
    return LogitsRouting(
        kind="logits",
        bias=tuple(tuple(r) for r in bias),
        noise_std=noise,
        token_correlation=rho,
    )


def test_the_fit_reproduces_the_distinct_experts_curve_within_10_percent():
    truth = skewed(3)
    trace = LogitsStream(truth, E, K, L, np.random.default_rng(11)).take(16384)
    counts = np.stack([np.bincount(trace[:, j].ravel(), minlength=E) for j in range(L)])
    fit = fit_logits(counts, trace, E, K, seed=5)
    assert fit.worst_error < 0.10
    assert 0.5 * truth.noise_std < fit.config.noise_std < 2.0 * truth.noise_std
    # a popularity-only model (uniform noise-free Zipf-like sampling) misses the curve
    flat = LogitsRouting(kind="logits", bias=((0.0,) * E,), noise_std=1.0)
    draws = LogitsStream(flat, E, K, L, np.random.default_rng(1)).take(16384)
    uniform = distinct_curve(draws, fit.batches, E)
    assert np.nanmax(np.abs(uniform / fit.trace_curve - 1)) > 0.2


def test_token_correlation_gives_temporal_locality():
    rates = []
    for rho in (0.0, 0.9):
        x = LogitsStream(skewed(1, rho), E, K, L, np.random.default_rng(2)).take(3000)
        d = reuse_distances([np.sort(t) for t in x[:, 0]], E)
        rates.append(lru_hit_curve(d, np.array([8]))[0])
    assert rates[1] > rates[0] + 0.1


def test_the_stream_is_deterministic_and_continues_across_takes():
    cfg = skewed(4, 0.8)
    whole = LogitsStream(cfg, E, K, L, np.random.default_rng(9)).take(3000)
    s = LogitsStream(cfg, E, K, L, np.random.default_rng(9))
    parts = np.concatenate([s.take(1024), s.take(976), s.take(1000)])
    np.testing.assert_array_equal(whole, parts)


def test_a_logits_scenario_runs_and_cli_fit_and_stats(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(
        "name: lg\nseed: 1\ncluster: dgx-h100\nmodel: mixtral-8x7b\n"
        "routing: {kind: logits, bias: [2, 1, 0.5, 0, 0, -0.5, -1, -2], noise_std: 0.8}\n"
        "parallelism: {dp: 8, ep: 8}\npolicies: {capacity_factor: null, overflow: dropless}\n"
        "workload: {kind: layer, tokens: 4096}\n"
    )
    a = moesim.run(load_scenario(f)).summary
    b = moesim.run(load_scenario(f)).summary
    assert a["expert_load"] == b["expert_load"]
    assert a["expert_load"][0] > a["expert_load"][7]
    x = LogitsStream(skewed(2), E, K, L, np.random.default_rng(0)).take(2048)
    np.savez(tmp_path / "t.npz", experts=x)
    assert main(["routing", "stats", str(tmp_path / "t.npz"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokens"] == 2048 and stats["layers"] == L and stats["top_k"] == K
    assert len(stats["cross_layer_correlation"]) == L - 1
    assert main(["routing", "fit", str(tmp_path / "t.npz")]) == 0
    out = capsys.readouterr().out
    assert "kind: logits" in out and "noise_std" in out
    (tmp_path / "bad.jsonl").write_text('{"experts": [[1, 1]]}\n')
    assert main(["routing", "stats", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1: experts[0]: an expert listed twice" in capsys.readouterr().err
