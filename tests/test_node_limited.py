"""Group/node-limited routing (issue 12): a model with ``expert_groups``/``topk_groups``
(DeepSeek-V3: 8 groups, top-4) samples each token's experts from its best groups only, so
with one group per node a token reaches at most ``topk_groups`` nodes, and DeepEP's
dispatch (a token sent once per node) moves correspondingly fewer bytes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim
from moesim.loader import load_scenario
from moesim.routing.distributions import sample_choices


@settings(max_examples=60, deadline=None)
@given(
    n_groups=st.sampled_from([2, 4, 8]),
    size=st.integers(1, 8),
    keep=st.integers(1, 8),
    k=st.integers(1, 8),
    tokens=st.integers(1, 64),
    skew=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**32 - 1),
    depth_all=st.booleans(),
)
def test_every_token_stays_within_its_groups(
    n_groups, size, keep, k, tokens, skew, seed, depth_all
):
    keep = min(keep, n_groups)
    experts = n_groups * size
    k = min(k, keep * size)
    p = np.arange(1, experts + 1, dtype=float) ** -skew
    p /= p.sum()
    rng = np.random.default_rng(seed)
    depth = experts if depth_all else k
    ranking, scores = sample_choices(rng, p, tokens, depth, (n_groups, keep))
    assert ranking.shape == (tokens, min(depth, keep * size))
    groups = ranking // size
    for row in groups:  # every ranked expert (top-k and reroute candidates alike)
        assert len(set(row.tolist())) <= keep
    assert all(len(set(r.tolist())) == len(r) for r in ranking)  # no expert twice
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_without_groups_sampling_is_unchanged():
    p = np.full(16, 1 / 16)
    a = sample_choices(np.random.default_rng(4), p, 100, 4)
    b = sample_choices(np.random.default_rng(4), p, 100, 4, (4, 4))  # every group kept
    np.testing.assert_array_equal(a[0], b[0])


SCENARIO = """name: ds
seed: 1
cluster: {{preset: h800-rail, nodes: 8}}
model: {{preset: deepseek-v3{groups}}}
routing: {{kind: uniform}}
parallelism: {{dp: 64, ep: 64, a2a: deepep}}
policies: {{capacity_factor: null, overflow: dropless}}
workload: {{kind: layer, tokens: 2048}}
"""


def test_deepseek_v3_reaches_at_most_four_nodes_and_deepep_sends_less(tmp_path):
    out = {}
    for name, groups in (("limited", ""), ("free", ", expert_groups: null, topk_groups: null")):
        f = tmp_path / f"{name}.yaml"
        f.write_text(SCENARIO.format(groups=groups))
        res = moesim.run(load_scenario(f))
        rec = res.simulated.records
        assert rec.routing.node_tokens is not None
        out[name] = (rec.routing.node_tokens.sum(), rec.sent_bytes)
    tokens = 2048
    # one group per node (256 experts, ep 64 over 8 nodes): at most 4 nodes per token
    assert out["limited"][0] <= 4 * tokens
    # uniform top-8 over 8 nodes reaches 8 x (1 - (7/8)^8 ...) ~ 5.3 nodes per token
    assert out["free"][0] > 5 * tokens
    assert out["limited"][1] < 0.95 * out["free"][1]
