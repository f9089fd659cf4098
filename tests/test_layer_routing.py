"""routing.layers: each MoE layer with its own popularity."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import rng
from moesim.config.routing import DirichletRouting, UniformRouting, ZipfRouting
from moesim.cost.offload import ExpertOffload, touched_experts
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.loader import scenario_from_dict
from moesim.routing.distributions import layer_popularities, popularity
from moesim.system import build_system


def test_same_layers_repeat_the_single_popularity() -> None:
    cfg = ZipfRouting(kind="zipf", s=1.2, permute=True)
    pops = layer_popularities(cfg, 16, 5, rng.stream(3, "popularity"))
    assert pops.shape == (5, 16)
    assert np.array_equal(pops[0], popularity(cfg, 16, rng.stream(3, "popularity")))
    assert all(np.array_equal(row, pops[0]) for row in pops)


def test_independent_layers_differ_but_keep_the_distribution() -> None:
    zipf = ZipfRouting(kind="zipf", s=1.2, layers="independent")
    pops = layer_popularities(zipf, 16, 6, rng.stream(3, "popularity"))
    assert np.allclose(pops.sum(axis=1), 1.0)
    # each layer is a shuffle of the same Zipf weights, with a different hottest expert
    assert all(np.allclose(np.sort(row), np.sort(pops[0])) for row in pops)
    assert len({int(np.argmax(row)) for row in pops}) > 1
    dirichlet = DirichletRouting(kind="dirichlet", alpha=0.5, layers="independent")
    d = layer_popularities(dirichlet, 16, 4, rng.stream(3, "popularity"))
    assert not np.allclose(d[0], d[1])
    uniform = UniformRouting(kind="uniform", layers="independent")
    u = layer_popularities(uniform, 16, 4, rng.stream(3, "popularity"))
    assert np.allclose(u, 1 / 16)


def _scenario(layers: str, extra: dict | None = None):  # type: ignore[no-untyped-def]
    return scenario_from_dict(
        {
            "name": "per-layer",
            "seed": 2,
            "cluster": "dgx-h100",
            "model": {"preset": "mixtral-8x7b", "layers": 8},
            "routing": {"kind": "zipf", "s": 1.5, "layers": layers},
            "parallelism": {"dp": 8, "ep": 8},
            "policies": {"capacity_factor": None, "overflow": "dropless"},
            "workload": {"kind": "layer", "tokens": 4096},
            **(extra or {}),
        }
    )


def test_layer_cost_spreads_samples_over_the_layers() -> None:
    same = simulated_layer_cost(build_system(_scenario("same")))
    ind = simulated_layer_cost(build_system(_scenario("independent")))
    assert same.samples_for(1024) == 3 and ind.samples_for(1024) == 8
    picked = {int(np.argmax(ind.sample_popularity(i, 8))) for i in range(8)}
    assert len(picked) > 1  # different layers, different hot experts
    assert len({int(np.argmax(same.sample_popularity(i, 3))) for i in range(3)}) == 1
    # deterministic, and the same expected work: only which expert is hot moves
    again = simulated_layer_cost(build_system(_scenario("independent")))
    assert ind.sample(1024).time_s == again.sample(1024).time_s
    assert ind.sample(1024).time_s == pytest.approx(same.sample(1024).time_s, rel=0.25)


def test_touched_experts_follow_each_layers_popularity() -> None:
    """With one hot expert per layer (a different one each), few tokens touch mostly their
    own layer's hot expert."""
    pops = np.full((4, 8), 0.001)
    for layer in range(4):
        pops[layer, layer] = 1.0
    pops /= pops.sum(axis=1, keepdims=True)
    used = touched_experts(np.random.default_rng(0), pops, tokens=4, top_k=1, layers=4)
    assert used.shape == (4, 8)
    assert all(used[layer, layer] for layer in range(4))
    assert used.sum() <= 4 + 2


def test_offload_pins_each_layers_own_hottest_experts() -> None:
    s = scenario_from_dict(
        {
            "name": "per-layer-offload",
            "seed": 2,
            "cluster": "single-h100",
            "model": {"preset": "mixtral-8x7b", "layers": 8},
            "routing": {"kind": "zipf", "s": 1.5, "layers": "independent"},
            "policies": {
                "capacity_factor": None,
                "overflow": "dropless",
                "offload": {"experts": {"policy": "static", "cache_experts": 8}},
            },
            "workload": {
                "kind": "serving",
                "duration_s": 2,
                "arrival": {"kind": "poisson", "rate_per_s": 1},
                "prompt_tokens": {"kind": "constant", "value": 16},
                "output_tokens": {"kind": "constant", "value": 4},
            },
        }
    )
    off = ExpertOffload(build_system(s), s.policies.offload.experts)  # type: ignore[arg-type]
    pinned = [next(iter(part.pinned)) % 8 for part in off.hbm[0].parts]
    hottest = [int(np.argmax(row)) for row in off.base]
    assert pinned == hottest and len(set(pinned)) > 1
