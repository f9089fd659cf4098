"""Routing consumed in order (issue 12): serving iterations and training micro-batches are
priced from the tokens they take from a trace (or a logits model), so the per-expert counts
that price a run are exactly the trace's over the tokens it consumed, and each batch's time
follows its own routing (:mod:`moesim.cost.routed_layers`)."""

from __future__ import annotations

import numpy as np
import pytest
from test_routing_trace import counts_of, cycled, recorded, scenario, write_jsonl

import moesim
from moesim.cost.routed_layers import RoutedLayerCost
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.loader import load_scenario
from moesim.routing.replay import routing_feed
from moesim.system import build_system

SERVING = (
    "{kind: serving, duration_s: 2, warmup_s: 0, arrival: {kind: poisson, rate_per_s: 20},"
    " prompt_tokens: {kind: constant, value: 64}, output_tokens: {kind: constant, value: 16}}"
)


def test_serving_prices_every_iteration_from_its_own_tokens(tmp_path):
    x = recorded(4000)
    write_jsonl(tmp_path / "t.jsonl", x)
    res = moesim.run(scenario(tmp_path, "t.jsonl", SERVING))
    used = int(res.simulated.records.iterations.batch_tokens.sum())
    routed = res.simulated.routed
    np.testing.assert_array_equal(routed.counts, counts_of(cycled(x, used)))
    np.testing.assert_array_equal(routed.priced, counts_of(cycled(x, used)))


def test_training_prices_every_micro_batch_of_every_step(tmp_path):
    x = recorded(3000)
    np.savez_compressed(tmp_path / "t.npz", experts=x)
    w = "{kind: training, seq_len: 128, micro_batch_sequences: 1, microbatches: 4, steps: 2}"
    res = moesim.run(scenario(tmp_path, "t.npz", w))
    need = 2 * 4 * 128 * 8
    np.testing.assert_array_equal(res.simulated.routed.priced, counts_of(cycled(x, need)))
    np.testing.assert_array_equal(res.simulated.routed.counts, counts_of(cycled(x, need)))


@pytest.mark.parametrize(
    ("par", "cluster", "bound"),
    [
        ("{dp: 1, ep: 1}", "single-h200", 1e-9),
        ("{dp: 8, ep: 8}", "dgx-h100", 0.01),
        ("{dp: 8, ep: 2}", "dgx-h100", 0.03),
    ],
)
def test_the_closed_form_against_every_routed_layer_simulated(tmp_path, par, cluster, bound):
    """One expert device: the closed form is the layer simulation's time exactly (nothing
    else in the layer depends on the routing); with expert parallelism its all-to-all is the
    bucket's mean (measured within 0.04% at ep 8 and 1.9% at ep 2, bounds 1% and 3%). The bucket alone is off by up to
    15% on one device: the per-batch routing matters."""
    x = recorded(6000, seed=4)
    write_jsonl(tmp_path / "t.jsonl", x)
    scenario(tmp_path, "t.jsonl", "{kind: layer, tokens: 64}")  # writes s.yaml
    f = tmp_path / "s.yaml"
    f.write_text(f.read_text().replace("{dp: 8, ep: 8}", par).replace("dgx-h100", cluster))
    s = load_scenario(f)
    system = build_system(s)
    cost = simulated_layer_cost(system)
    routed = RoutedLayerCost(system, cost)
    feed = routing_feed(s)
    assert feed is not None
    bucket_off = 0.0
    for n in (1, 4, 16, 64, 256):
        for _ in range(3):
            b = feed.take(n)
            exact = routed.exact(b)
            assert routed.price(b).time_s == pytest.approx(exact, rel=bound)
            bucket_off = max(bucket_off, abs(cost.sample(n).time_s / exact - 1))
    if cluster == "single-h200":
        assert bucket_off > 0.05  # per-batch pricing moves the time
