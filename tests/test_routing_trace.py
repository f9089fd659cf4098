"""Routing traces (issue 12): reading both formats in chunks, located errors, replay through
the layer, training and serving workloads with exactly the recorded per-expert counts, and
an offloaded decode whose LRU hit rate is the closed form of the same trace."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import moesim
from moesim.cli import main
from moesim.config.routing import LogitsRouting
from moesim.errors import ScenarioError
from moesim.loader import load_scenario
from moesim.routing import trace as trace_mod
from moesim.routing.logits import LogitsStream
from moesim.routing.stats import reuse_distances
from moesim.routing.trace import TraceCursor, TraceError, trace_info

LAYERS, EXPERTS, K = 8, 8, 2


def recorded(tokens: int, seed: int = 1, layers: int = LAYERS) -> np.ndarray:
    bias = np.log(np.arange(1, EXPERTS + 1, dtype=float) ** -1.2)
    cfg = LogitsRouting(
        kind="logits", bias=(tuple(bias),), token_correlation=0.7, layer_correlation=0.4
    )
    return LogitsStream(cfg, EXPERTS, K, layers, np.random.default_rng(seed)).take(tokens)


def write_jsonl(path: Path, x: np.ndarray, weights: bool = False) -> Path:
    with path.open("w") as f:
        for i, row in enumerate(x):
            line = {"step": i // 3, "experts": row.tolist()}
            if weights:
                line["weights"] = np.full(row.shape, 0.5).tolist()
            f.write(json.dumps(line) + "\n")
    return path


def counts_of(x: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(x[:, j].ravel(), minlength=EXPERTS) for j in range(x.shape[1])])


def cycled(x: np.ndarray, n: int) -> np.ndarray:
    return x[np.arange(n) % len(x)]


SCENARIO = """
name: t
seed: 3
cluster: dgx-h100
model: {{preset: mixtral-8x7b, layers: {layers}}}
routing: {{kind: trace, path: {path}}}
parallelism: {{dp: 8, ep: 8}}
policies: {{capacity_factor: null, overflow: dropless}}
workload: {workload}
"""


def scenario(tmp_path: Path, trace: str, workload: str, layers: int = LAYERS, **fmt: str):
    f = tmp_path / "s.yaml"
    f.write_text(SCENARIO.format(path=trace, workload=workload, layers=layers))
    return load_scenario(f)


# --- reading -----------------------------------------------------------------------


def test_both_formats_read_the_same_tokens_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_mod, "CHUNK_TOKENS", 64)
    x = recorded(1000)
    j = write_jsonl(tmp_path / "t.jsonl", x, weights=True)
    z = tmp_path / "t.npz"
    np.savez_compressed(z, experts=x.astype(np.uint8), step=np.arange(len(x)) // 3)
    for path in (j, z):
        c = TraceCursor(str(path), EXPERTS)
        parts = [c.take(n).experts for n in (1, 63, 200, 736)]
        assert all(len(chunk) <= 736 for chunk in parts)
        np.testing.assert_array_equal(np.concatenate(parts), x)
        again = c.take(5).experts  # cycles back to the first token
        np.testing.assert_array_equal(again, x[:5])
        assert c.passes == 1
        info = trace_info(str(path), EXPERTS)
        assert (info.tokens, info.moe_layers, info.top_k) == (1000, LAYERS, K)
        np.testing.assert_array_equal(info.counts, counts_of(x))
        assert info.steps == 334
    assert trace_info(str(j)).has_weights and not trace_info(str(z)).has_weights


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ('{"experts": [[0, 9]]}', "experts[0][1]: expert id 9 outside [0, 8)"),
        ('{"experts": [[1, 1]]}', "experts[0]: an expert listed twice"),
        ('{"experts": [[1, 2], [3]]}', "same number of experts"),
        (
            '{"experts": [[1, 2], [3, 4]]}',
            "2 MoE layers x 2 experts, the trace's first token has 1 x 2",
        ),
        ('{"experts": [[1, 2]], "weights": [[0.5, -1]]}', "weights"),
        ('{"experts": [[1, 2]], "colour": 1}', "unknown key 'colour'"),
        ("not json", "not valid JSON"),
        ('{"step": 0, "experts": [[1, 2]]}', "step: give it on every line or on none"),
    ],
)
def test_a_bad_line_is_located(tmp_path, line, where):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"experts": [[0, 1]]}\n\n' + line + "\n")
    with pytest.raises(TraceError) as e:
        trace_info(str(f), EXPERTS)
    assert "line 3" in str(e.value) and where in str(e.value)


def test_decreasing_steps_and_bad_npz_are_located(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"step": 2, "experts": [[0, 1]]}\n{"step": 1, "experts": [[0, 1]]}\n')
    with pytest.raises(TraceError, match="line 2: step: 1 after 2"):
        trace_info(str(f))
    z = tmp_path / "t.npz"
    x = recorded(50, layers=1)
    x[17, 0, 1] = 12
    np.savez(z, experts=x)
    with pytest.raises(TraceError, match=r"token 17: experts\[0\]\[1\]: expert id 12"):
        trace_info(str(z), EXPERTS)
    np.savez(z, experts=x[:, :, 0])
    with pytest.raises(TraceError, match="experts: expected an int array"):
        trace_info(str(z))


def test_a_trace_that_does_not_match_the_model_is_a_located_error(tmp_path, capsys):
    write_jsonl(tmp_path / "t.jsonl", recorded(20, layers=4))
    with pytest.raises(ScenarioError) as e:
        scenario(tmp_path, "t.jsonl", "{kind: layer, tokens: 16}")
    msg = str(e.value)
    assert "s.yaml:6:" in msg and "routing.path" in msg
    assert "line 1: experts: 4 MoE layers per token, the model has 8 MoE layers" in msg
    (tmp_path / "s.yaml").write_text(
        SCENARIO.format(path="missing.jsonl", workload="{kind: layer, tokens: 4}", layers=8)
    )
    assert main(["check", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "routing.path" in err and "no such file" in err and "Traceback" not in err


# --- replay through the workloads ------------------------------------------------


def test_layer_replays_the_first_tokens_exactly(tmp_path):
    x = recorded(3000)
    write_jsonl(tmp_path / "t.jsonl", x)
    res = moesim.run(scenario(tmp_path, "t.jsonl", "{kind: layer, tokens: 2048}"))
    rec = res.simulated.records
    np.testing.assert_array_equal(rec.routing.counts.sum(axis=0), counts_of(x[:2048])[0])
    np.testing.assert_array_equal(res.summary["expert_load"], counts_of(x[:2048])[0])
    assert res.summary["routing"] == {
        "kind": "trace",
        "tokens": 2048,
        "trace_tokens": 3000,
        "cycled": 0,
    }


def test_training_consumes_every_micro_batch_in_order_cycling(tmp_path):
    x = recorded(3000)
    np.savez_compressed(tmp_path / "t.npz", experts=x)
    w = "{kind: training, seq_len: 128, micro_batch_sequences: 1, microbatches: 4, steps: 2}"
    res = moesim.run(scenario(tmp_path, "t.npz", w))
    need = 2 * 4 * 128 * 8  # steps x micro-batches x tokens of all dp ranks
    np.testing.assert_array_equal(res.simulated.routed.counts, counts_of(cycled(x, need)))
    assert res.summary["routing"]["cycled"] == need // 3000
    assert "replayed from its start" in res.summary["routing"]["note"]


def test_serving_consumes_every_iteration_in_order(tmp_path):
    x = recorded(4000)
    write_jsonl(tmp_path / "t.jsonl", x)
    w = (
        "{kind: serving, duration_s: 2, warmup_s: 0, arrival: {kind: poisson, rate_per_s: 20},"
        " prompt_tokens: {kind: constant, value: 64}, output_tokens: {kind: constant, value: 16}}"
    )
    res = moesim.run(scenario(tmp_path, "t.jsonl", w))
    used = int(res.simulated.records.iterations.batch_tokens.sum())
    assert used > 0
    np.testing.assert_array_equal(res.simulated.routed.counts, counts_of(cycled(x, used)))


# --- offloading: the cache sees the real sequence ---------------------------------

OFFLOAD = """
name: offload-lru
seed: 5
cluster: workstation-a5000
model: {{preset: mixtral-8x7b, layers: 8}}
routing: {{kind: trace, path: t.jsonl}}
parallelism: {{dp: 1, ep: 1}}
policies:
  capacity_factor: null
  overflow: dropless
  offload: {{experts: {{policy: lru, cache_experts: {cache}, host_memory: pinned}}}}
workload:
  kind: serving
  duration_s: 30
  warmup_s: 0
  arrival: {{kind: poisson, rate_per_s: 0.5}}
  prompt_tokens: {{kind: constant, value: 1}}
  output_tokens: {{kind: constant, value: 40}}
  scheduler: {{max_batch_tokens: 256, max_seqs: 1}}
"""


def test_offloaded_decode_matches_the_closed_form_lru_at_every_cache_size(tmp_path):
    x = recorded(800)
    write_jsonl(tmp_path / "t.jsonl", x)
    pop = trace_info(str(tmp_path / "t.jsonl"), EXPERTS).popularity()
    rates = []
    for per_layer in range(K, EXPERTS + 1):
        f = tmp_path / "off.yaml"
        f.write_text(OFFLOAD.format(cache=per_layer * LAYERS))
        res = moesim.run(load_scenario(f))
        rec = res.simulated.records
        batches = rec.iterations.batch_tokens
        assert set(batches.tolist()) == {1}  # batch-1 decode
        tokens = cycled(x, int(batches.sum()))
        hits = uses = 0
        for j in range(LAYERS):
            warm = np.argsort(-pop[j], kind="stable")
            d = reuse_distances([np.sort(t) for t in tokens[:, j]], EXPERTS, warm)
            hits += int((d < per_layer).sum())
            uses += d.size
        off = rec.offload.totals
        assert (off.accesses, off.hbm_hits) == (uses, hits)
        rates.append(hits / uses)
    assert rates[-1] == 1.0 and rates[0] < 0.9
    assert all(a <= b for a, b in itertools.pairwise(rates))
