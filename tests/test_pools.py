"""Prefill/decode pools (issue 16 part 2): the KV transfer on the critical path in closed
form, tokens conserved across the pools, one instance per pool against co-located
serving, and a located error for every pool rule."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import api
from moesim.engine.kv_transfer import kv_transfer_s
from moesim.errors import ScenarioError
from moesim.loader import load_scenario, scenario_from_dict

BASE: dict[str, Any] = {
    "name": "pd",
    "seed": 3,
    "cluster": {"preset": "h100-rail", "nodes": 2, "launch": "graph"},
    "model": "mixtral-8x7b",
    "routing": {"kind": "zipf", "s": 1.0},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
    "workload": {
        "kind": "serving",
        "duration_s": 10,
        "warmup_s": 1,
        "arrival": {"kind": "poisson", "rate_per_s": 20},
        "prompt_tokens": {"kind": "lognormal", "mean": 1000, "sigma": 0.5, "min": 16, "max": 8192},
        "output_tokens": {"kind": "lognormal", "mean": 100, "sigma": 0.5, "min": 1, "max": 1024},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100},
        "pools": {
            "prefill": {"parallelism": {"dp": 8, "ep": 8}},
            "decode": {"parallelism": {"dp": 8, "ep": 8}},
        },
    },
}


def _scenario(**workload: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d["workload"].update(workload)
    return d


def _trace(rows: list[tuple[float, int, int]]) -> dict[str, Any]:
    return {
        "kind": "trace",
        "arrival_s": [r[0] for r in rows],
        "prompt_tokens": [r[1] for r in rows],
        "output_tokens": [r[2] for r in rows],
    }


def _trace_scenario(rows: list[tuple[float, int, int]]) -> dict[str, Any]:
    d = _scenario(arrival=_trace(rows), warmup_s=0)
    for k in ("prompt_tokens", "output_tokens"):
        del d["workload"][k]
    return d


def test_one_request_ttft_is_prefill_plus_transfer() -> None:
    """One request: its TTFT is the prefill iteration plus the KV transfer from prefill
    rank 0 (GPU 0, node 0) to decode rank 0 (GPU 8, node 1) in closed form (latency +
    bytes / the 50 GB/s NDR rail), and its decode is the sum of its decode iterations."""
    res = api.run(scenario_from_dict(_trace_scenario([(0.5, 1024, 4)])))
    pooled = res.simulated.run
    pre, dec = pooled.prefill[0].iterations, pooled.decode[0].iterations
    assert len(pre.duration_s) == 1 and len(dec.duration_s) == 3
    m = res.scenario.model
    xfer = kv_transfer_s(res.system.paths, m, 1024, [0], [8])
    nbytes = 32 * 1024 * 2 * 8 * 128 * 2  # layers x prompt x (K, V) x kv heads x head dim x bf16
    assert xfer == pytest.approx(res.system.paths.latency_s(0, 8) + nbytes / 50e9, rel=1e-9)
    assert pooled.transfer_s[0] == pytest.approx(xfer, rel=1e-12)
    assert pre.start_s[0] == 0.5
    ttft_ms = res.summary["ttft_ms"]["p50"]
    assert ttft_ms == pytest.approx((pre.duration_s[0] + xfer) * 1e3, abs=1e-5)
    assert res.summary["pools"]["prefill"]["prefill_ttft_ms"]["p50"] == pytest.approx(
        pre.duration_s[0] * 1e3, abs=1e-5
    )
    assert dec.start_s[0] == pytest.approx(0.5 + pre.duration_s[0] + xfer, rel=1e-12)
    e2e = res.records.requests
    assert e2e.finish_s[0] - e2e.first_token_s[0] == pytest.approx(dec.duration_s.sum(), 1e-12)
    assert int(e2e.generated_tokens[0]) == 4


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.floats(0.0, 2.0), st.integers(1, 3000), st.integers(1, 60)),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from(["round_robin", "least_loaded"]),
)
def test_tokens_are_conserved_across_pools(rows: list[tuple[float, int, int]], route: str) -> None:
    """Every request finishes with exactly its output tokens: one sampled by the prefill
    pool (its first) and the rest by the decode pool; the iterations' sampled tokens add
    up to the same total, the prompts prefilled to the prompt tokens."""
    rows = sorted(rows)
    d = _trace_scenario(rows)
    d["workload"]["pools"]["route"] = route
    res = api.run(scenario_from_dict(d))
    pooled, e2e = res.simulated.run, res.records.requests
    out = np.array([r[2] for r in rows])
    assert np.isfinite(e2e.finish_s).all()
    assert (e2e.generated_tokens == out).all()
    pre_sampled = sum(int(r.iterations.sampled_tokens.sum()) for r in pooled.prefill)
    dec_sampled = sum(int(r.iterations.sampled_tokens.sum()) for r in pooled.decode)
    assert pre_sampled == len(rows)
    assert pre_sampled + dec_sampled == int(out.sum())
    prefilled = sum(int(r.iterations.prefill_tokens.sum()) for r in pooled.prefill)
    assert prefilled == sum(r[1] for r in rows)
    assert sum(int(r.iterations.prefill_tokens.sum()) for r in pooled.decode) == 0
    assert (np.isnan(pooled.transfer_s) == (out <= 1)).all()


def test_one_instance_each_against_co_located() -> None:
    """Two nodes as one prefill and one decode instance against the same load served
    co-located on one node: the decode pool's TPOT has no prefill in its batches, so it is
    lower; TTFT is of the same order (prefill alone plus a few ms of transfer); the same
    requests finish with the same tokens."""
    pd = api.run(scenario_from_dict(_scenario()))
    co_d = _scenario(pools=None)
    co_d["cluster"]["nodes"] = 1
    co_d["parallelism"] = {"dp": 8, "ep": 8}
    co = api.run(scenario_from_dict(co_d))
    assert pd.summary["completed_requests"] == co.summary["completed_requests"] > 100
    assert pd.summary["output_tokens"] == co.summary["output_tokens"]
    assert pd.summary["tpot_ms"]["p50"] < co.summary["tpot_ms"]["p50"]
    assert 0.5 < pd.summary["ttft_ms"]["p50"] / co.summary["ttft_ms"]["p50"] < 2.0
    pools = pd.summary["pools"]
    assert 0 < pools["kv_transfer"]["ms"]["p50"] < 0.1 * pd.summary["ttft_ms"]["p50"]
    assert pools["prefill"]["nodes"] == pools["decode"]["nodes"] == 1
    assert pools["decode"]["per_user_tokens_per_s"]["p50"] == pytest.approx(
        1e3 / pools["decode"]["tpot_ms"]["p50"], rel=0.05
    )


def _issues(tmp_path: Path, d: dict[str, Any]) -> list[tuple[str, str]]:
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [(i.path, i.message) for i in info.value.issues]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            lambda d: d["workload"]["pools"].update(
                decode={"instances": 2, "parallelism": {"dp": 8, "ep": 8}}
            ),
            "workload.pools",
            "need 24 devices",
        ),
        (
            lambda d: d["workload"]["pools"].update(prefill={"parallelism": {"dp": 4, "ep": 4}}),
            "workload.pools.prefill.parallelism",
            "whole nodes",
        ),
        (
            lambda d: d["workload"]["pools"].update(decode={"parallelism": {"dp": 8, "ep": 16}}),
            "workload.pools.decode.parallelism.ep",
            "must divide dp x tp",
        ),
        (
            lambda d: d["workload"]["pools"].update(
                decode={"parallelism": {"dp": 8, "ep": 8, "pp": 2}}
            ),
            "workload.pools.decode.parallelism.pp",
            "pipeline",
        ),
        (
            lambda d: d.update(parallelism={"dp": 16, "ep": 8}),
            "parallelism",
            "leave the top-level one out",
        ),
        (
            lambda d: d["workload"]["pools"].update(prefill={"parallelism": {"dp": 8, "ep": 1}}),
            "workload.pools.prefill.parallelism",
            "prefill pool: the weights do not fit",
        ),
        (
            lambda d: d["workload"]["pools"].update(
                decode={"parallelism": {"dp": 8, "ep": 8}, "kv_cache_fraction": 1e-9}
            ),
            "workload.pools.decode.kv_cache_fraction",
            "decode pool: leaves no KV block",
        ),
        (
            lambda d: d.update(cluster={"preset": "tpu-v3-32"}),
            "workload.pools",
            "cluster of nodes",
        ),
        (
            lambda d: d["workload"]["pools"].update(
                decode={"parallelism": {"dp": 8, "ep": 8}, "scheduler": {"chunked_prefill": False}}
            ),
            "workload.pools.decode.scheduler.chunked_prefill",
            "without chunked prefill",
        ),
    ],
)
def test_pool_rules_are_located(tmp_path: Path, change: Any, field: str, words: str) -> None:
    d = _scenario()
    change(d)
    found = _issues(tmp_path, d)
    assert any(p == field and words in m for p, m in found), found


def test_co_located_serving_has_no_pools_section() -> None:
    """Without pools the workload is the co-located server (pools stay opt-in)."""
    d = _scenario(pools=None, duration_s=2, warmup_s=0.5)
    d["cluster"]["nodes"] = 1
    d["parallelism"] = {"dp": 8, "ep": 8}
    assert "pools" not in api.run(scenario_from_dict(d)).summary
