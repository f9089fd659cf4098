"""Per-phase routing (issue 12): a logits model with ``decode`` parameters routes a serving
run's decode tokens from them and its prompt tokens from the rest, and ``moesim routing fit
--phases`` fits each phase of a trace (told apart by its steps) separately."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_routing_trace import EXPERTS, K

import moesim
from moesim.cli import main
from moesim.config.routing import LogitsRouting
from moesim.loader import load_scenario
from moesim.routing.logits import LogitsStream
from moesim.routing.phases import decode_mask

SCENARIO = """
name: phases
seed: 2
cluster: dgx-h100
model: {preset: mixtral-8x7b, layers: 2}
routing:
  kind: logits
  bias: [0, 0, 0, 0, 0, 0, 20, 20]
  noise_std: 0.1
  decode: {bias: [20, 20, 0, 0, 0, 0, 0, 0]}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: null, overflow: dropless}
workload:
  kind: serving
  duration_s: 2
  warmup_s: 0
  arrival: {kind: poisson, rate_per_s: 20}
  prompt_tokens: {kind: constant, value: 48}
  output_tokens: {kind: constant, value: 12}
"""


def test_decode_tokens_route_by_the_decode_parameters(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(SCENARIO)
    res = moesim.run(load_scenario(f))
    it = res.simulated.records.iterations
    decodes = int((it.batch_tokens - it.prefill_tokens).sum())
    prompts = int(it.prefill_tokens.sum())
    assert decodes > 0 and prompts > 0
    routed = res.simulated.routed
    for counts in (routed.counts, routed.priced):
        np.testing.assert_array_equal(counts[:, 0], decodes)  # each decode: experts 0 and 1
        np.testing.assert_array_equal(counts[:, 1], decodes)
        np.testing.assert_array_equal(counts[:, 6], prompts)  # each prompt token: 6 and 7
        assert counts[:, 2:6].sum() == 0


def test_decode_mask_by_step_size():
    step = np.array([0] * 5 + [1, 2, 3] + [4] * 3 + [5, 6])
    np.testing.assert_array_equal(
        decode_mask(step), [False] * 5 + [True] * 3 + [False] * 3 + [True] * 2
    )
    assert decode_mask(step, 3)[8:11].all()


def phase_trace(prompts: int, prefill: int, decode: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of ``prefill`` tokens (one step) then ``decode`` one-token steps, prefill
    from a skewed, weakly persistent model, decode from another, strongly persistent."""
    ranks = np.arange(1, EXPERTS + 1, dtype=float)
    a = LogitsRouting(
        kind="logits",
        bias=(tuple(np.log(ranks**-1.0)),),
        noise_std=1.0,
        token_correlation=0.9,
        correlated_share=0.5,
    )
    b = LogitsRouting(
        kind="logits",
        bias=(tuple(np.log(ranks[::-1] ** -1.5)),),
        noise_std=1.0,
        token_correlation=0.99,
        correlated_share=0.9,
    )
    gen = np.random.default_rng(7)
    pre = LogitsStream(a, EXPERTS, K, 2, gen)
    dec = LogitsStream(b, EXPERTS, K, 2, gen)
    parts, steps, step = [], [], 0
    for _ in range(prompts):
        parts.append(pre.take(prefill))
        steps += [step] * prefill
        step += 1
        parts.append(dec.take(decode))
        steps += list(range(step, step + decode))
        step += decode
    return np.concatenate(parts), np.array(steps)


@pytest.mark.slow
def test_fit_phases_recovers_each_phase(tmp_path, capsys):
    x, step = phase_trace(8, 256, 256)
    path = tmp_path / "t.npz"
    np.savez(path, experts=x, step=step)
    assert main(["routing", "fit", str(path), "--phases", "--hold-out", "halves"]) == 0
    out = capsys.readouterr().out
    yaml_text = out[out.index("routing:") :]
    cfg = LogitsRouting(**yaml.safe_load(yaml_text)["routing"])
    assert cfg.decode is not None
    decode = cfg.for_decode()
    # the decode model prefers the high expert ids, the prefill model the low ones
    assert np.argmax(decode.bias[0]) >= EXPERTS // 2 > np.argmax(cfg.bias[0])
    assert decode.token_correlation > cfg.token_correlation or (
        decode.correlated_share > cfg.correlated_share
    )
    held = [
        float(line.split()[-1].rstrip("%"))
        for line in out.splitlines()
        if "held out" in line and "worst" in line
    ]
    assert len(held) == 2 and max(held) < 10.0
