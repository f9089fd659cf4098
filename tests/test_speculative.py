"""Speculative decoding / multi-token prediction (``workload.speculative``, issue 16):
closed forms (acceptance 1 and 0), the chain's expectation and distribution of tokens
per step, the drafter's cost, tokens conserved (Hypothesis, co-located and pooled), and
a located error for every rule."""

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
from moesim.config.speculative import SpeculativeConfig
from moesim.cost.iteration import IterationCost
from moesim.cost.speculative import draft_pass
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.errors import ScenarioError
from moesim.loader import load_scenario, scenario_from_dict
from moesim.system import build_system

BASE: dict[str, Any] = {
    "name": "spec",
    "seed": 5,
    "cluster": {"preset": "dgx-h100", "launch": "graph"},
    "model": "mixtral-8x7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 8, "ep": 8},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
    "workload": {
        "kind": "serving",
        "duration_s": 10,
        "warmup_s": 0,
        "arrival": {"kind": "trace", "arrival_s": [0.0], "prompt_tokens": [256]},
    },
}


def _scenario(rows: list[tuple[float, int, int]], spec: dict[str, Any] | None) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d["workload"]["arrival"] = {
        "kind": "trace",
        "arrival_s": [r[0] for r in rows],
        "prompt_tokens": [r[1] for r in rows],
        "output_tokens": [r[2] for r in rows],
    }
    d["workload"]["speculative"] = spec
    return d


def _run(rows: list[tuple[float, int, int]], spec: dict[str, Any] | None) -> api.Result:
    return api.run(scenario_from_dict(_scenario(rows, spec)))


def test_expected_tokens_per_step_is_the_chain() -> None:
    s = SpeculativeConfig(draft_tokens=3, acceptance=0.8)
    assert s.expected_tokens_per_step == pytest.approx(1 + 0.8 + 0.64 + 0.512, rel=1e-12)
    s = SpeculativeConfig(draft_tokens=2, acceptance=(0.9, 0.5))
    assert s.expected_tokens_per_step == pytest.approx(1 + 0.9 + 0.45, rel=1e-12)


@pytest.mark.parametrize(("output", "steps"), [(1 + 4 * 5, 5), (1 + 4 * 5 + 2, 6)])
def test_all_drafts_accepted_in_closed_form(output: int, steps: int) -> None:
    """Acceptance 1 and k = 3: after the prefill's first token each step yields 4 tokens
    (the last step only what is left), each verifying 4 query tokens; TPOT is the decode
    steps' time over the output tokens after the first."""
    res = _run([(0.0, 256, output)], {"draft_tokens": 3, "acceptance": 1.0, "draft": "free"})
    it, req = res.records.iterations, res.records.requests
    assert len(it.duration_s) == 1 + steps
    assert list(it.batch_tokens[1:]) == [4] * steps
    assert list(it.prefill_tokens[1:]) == [0] * steps
    assert list(it.sampled_tokens[1:]) == [4] * (steps - 1) + [(output - 1) - 4 * (steps - 1)]
    assert int(req.generated_tokens[0]) == output
    tpot_s = (req.finish_s[0] - req.first_token_s[0]) / (output - 1)
    assert tpot_s == pytest.approx(it.duration_s[1:].sum() / (output - 1), rel=1e-12)
    assert res.summary["tpot_ms"]["p50"] == pytest.approx(tpot_s * 1e3, abs=1e-6)


def test_no_draft_accepted_costs_the_verification() -> None:
    """Acceptance 0: one token per step as without speculation, but each step verifies
    k + 1 = 3 tokens, so no step is faster than the plain decode's and the run is longer."""
    rows = [(0.0, 512, 40)]
    plain = _run(rows, None).records
    spec = _run(rows, {"draft_tokens": 2, "acceptance": 0.0, "draft": "free"}).records
    assert len(spec.iterations.duration_s) == len(plain.iterations.duration_s) == 40
    assert list(spec.iterations.batch_tokens[1:]) == [3] * 39
    assert (spec.iterations.duration_s[1:] >= plain.iterations.duration_s[1:]).all()
    assert spec.iterations.duration_s.sum() > plain.iterations.duration_s.sum()


def test_tokens_per_step_follow_the_acceptance_chain() -> None:
    """One long request at per-depth rates (0.8, 0.6, 0.5): the tokens of each decode step
    are 1 + the leading accepted drafts, with P(1 + a = j) from the chain; the mean tokens
    per step is 1 + p1 + p1 p2 + p1 p2 p3 (within 4 standard errors), and TPOT is the mean
    step over that."""
    rates = (0.8, 0.6, 0.5)
    out = 6001
    res = _run([(0.0, 128, out)], {"draft_tokens": 3, "acceptance": list(rates), "draft": "free"})
    it = res.records.iterations
    per_step = it.sampled_tokens[1:-1]  # the last step is capped by the output length
    a, b, c = rates
    p = np.array([1 - a, a * (1 - b), a * b * (1 - c), a * b * c])
    n = len(per_step)
    freq = np.bincount(per_step, minlength=5)[1:] / n
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n)), (freq, p)
    mean = 1 + 0.8 + 0.48 + 0.24
    sd = np.sqrt((p * np.arange(1, 5) ** 2).sum() - mean**2)
    assert abs(per_step.mean() - mean) < 4 * sd / np.sqrt(n)
    steps = it.duration_s[1:]
    tpot_ms = res.summary["tpot_ms"]["p50"]
    assert tpot_ms == pytest.approx(steps.mean() * len(steps) / (out - 1) * 1e3, abs=1e-6)
    assert tpot_ms == pytest.approx(steps.mean() / mean * 1e3, rel=4 * sd / mean / np.sqrt(n))


def test_mtp_module_adds_one_block_and_the_head_per_draft() -> None:
    """The drafter's pass is one layer of the model's own iteration at one token per
    drafting sequence (attention, the last block's MoE), the head and the 2d -> d
    projection; k passes per step lengthen every decode step by k times it."""
    rows = [(0.0, 300, 6)]
    free = _run(rows, {"draft_tokens": 2, "acceptance": 1.0, "draft": "free"})
    mtp = _run(rows, {"draft_tokens": 2, "acceptance": 1.0, "draft": "mtp_module"})
    sysm = build_system(mtp.scenario)
    cost = IterationCost(sysm, simulated_layer_cost(sysm))
    m = sysm.scenario.model
    # the first decode step: request 0 on rank 0 verifies 3 tokens after 300 cached
    d = draft_pass(cost, [1] + [0] * 7, [303] + [0] * 7)
    full = cost.time([1] + [0] * 7, [303.0] + [0.0] * 7, [303] + [0] * 7, [1] + [0] * 7)
    assert d.moe_s == pytest.approx(full.moe_s / m.layers, rel=1e-12)  # every Mixtral layer is MoE
    assert d.attention_s == pytest.approx(full.attention_s / m.layers, rel=1e-12)
    assert d.head_s > full.head_s
    assert d.total_s == pytest.approx(d.attention_s + d.moe_s + d.dense_s + d.head_s, rel=1e-12)
    gap = mtp.records.iterations.duration_s[1] - free.records.iterations.duration_s[1]
    assert gap == pytest.approx(2 * d.total_s, rel=1e-9)


def test_default_off_and_null_are_the_same_run() -> None:
    rows = [(0.0, 200, 30), (0.01, 300, 20)]
    a = _run(rows, None).summary
    d = _scenario(rows, None)
    del d["workload"]["speculative"]
    b = api.run(scenario_from_dict(d)).summary
    a.pop("wall_time_s", None)
    b.pop("wall_time_s", None)
    assert a == b


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.5), st.integers(1, 2000), st.integers(1, 80)),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 4),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_tokens_are_conserved(
    rows: list[tuple[float, int, int]], k: int, rate: float, pooled: bool
) -> None:
    """Every request ends with exactly its output tokens (never more), the iterations'
    sampled tokens add up to them, no step yields more than k + 1 tokens per sequence,
    and the prompts are prefilled exactly once."""
    rows = sorted(rows)
    d = _scenario(rows, {"draft_tokens": k, "acceptance": rate})
    d["workload"]["scheduler"] = {"max_batch_tokens": 512}
    if pooled:
        d["cluster"] = {"preset": "h100-rail", "nodes": 2, "launch": "graph"}
        del d["parallelism"]
        lay = {"parallelism": {"dp": 8, "ep": 8}}
        d["workload"]["pools"] = {"prefill": lay, "decode": lay}
    res = api.run(scenario_from_dict(d))
    req = res.records.requests
    out = np.array([r[2] for r in rows])
    assert np.isfinite(req.finish_s).all()
    assert (req.generated_tokens == out).all()
    runs = res.simulated.run.prefill + res.simulated.run.decode if pooled else [res.records]
    assert sum(int(r.iterations.sampled_tokens.sum()) for r in runs) == int(out.sum())
    assert sum(int(r.iterations.prefill_tokens.sum()) for r in runs) == sum(r[1] for r in rows)
    for r in runs:
        assert (r.iterations.sampled_tokens <= (k + 1) * r.iterations.running_seqs).all()


def _issues(tmp_path: Path, d: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [(i.path, i.message, i.location.line) for i in info.value.issues]


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"draft_tokens": 2, "acceptance": [0.9]}, "workload.speculative.acceptance", "2"),
        ({"draft_tokens": 1, "acceptance": 1.5}, "workload.speculative.acceptance", "[0, 1]"),
        (
            {"draft_tokens": 2, "acceptance": [0.9, -0.1]},
            "workload.speculative.acceptance",
            "[0, 1]",
        ),
        ({"draft_tokens": 0, "acceptance": 0.5}, "workload.speculative.draft_tokens", "1"),
        (
            {"draft_tokens": 1, "acceptance": 0.5, "draft": "eagle"},
            "workload.speculative.draft",
            "",
        ),
        ({"draft_tokens": 1}, "workload.speculative.acceptance", ""),
        ({"draft_tokens": 1, "acceptance": 0.5, "depth": 2}, "workload.speculative.depth", ""),
    ],
)
def test_rules_are_located(tmp_path: Path, spec: dict[str, Any], field: str, words: str) -> None:
    d = _scenario([(0.0, 100, 10)], spec)
    found = _issues(tmp_path, d)
    assert any(p.startswith(field) and words in m and line for p, m, line in found), found
