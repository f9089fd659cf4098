"""``routing: {kind: popularity, weights: [...]}``: a measured popularity vector or counts,
normalized; wrong length or negative values are located errors (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

import moesim
from moesim.errors import ScenarioError
from moesim.loader import load_scenario
from moesim.rng import stream
from moesim.routing.distributions import popularity

BASE = """name: p
seed: 2
cluster: dgx-h100
model: mixtral-8x7b
routing: {routing}
parallelism: {{dp: 8, ep: 8}}
policies: {{capacity_factor: null, overflow: dropless}}
workload: {{kind: layer, tokens: 20000}}
"""


def load(tmp_path, routing):
    f = tmp_path / "s.yaml"
    f.write_text(BASE.format(routing=routing))
    return load_scenario(f)


def test_counts_are_normalized_and_drive_the_sampled_loads(tmp_path):
    counts = [800, 400, 200, 100, 0, 0, 300, 200]
    s = load(tmp_path, f"{{kind: popularity, weights: {counts}}}")
    p = popularity(s.routing, 8, stream(1, "popularity"))
    np.testing.assert_allclose(p, np.array(counts) / sum(counts))
    load_ = np.asarray(moesim.run(s).summary["expert_load"])
    assert load_[4] == load_[5] == 0  # never chosen
    assert load_[0] > load_[1] > load_[2] > load_[3]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("[1, 2, 3]", "routing.weights: needs one weight per expert (model.experts = 8), got 3"),
        ("[1, 2, 3, -4, 1, 1, 1, 1]", "weights[3] is -4.0: weights must be >= 0"),
        ("[0, 0, 0, 0, 0, 0, 0, 0]", "weights are all zero"),
    ],
)
def test_bad_weights_are_located(tmp_path, weights, message):
    with pytest.raises(ScenarioError) as e:
        load(tmp_path, f"{{kind: popularity, weights: {weights}}}")
    assert "s.yaml:5:" in str(e.value) and message in str(e.value)
