"""Priced MoE layer buckets kept on disk: exact, keyed by the layer's inputs, shared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moesim
from moesim.cost import cost_store
from moesim.cost.cost_store import LayerCostStore, layer_key, store_in
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.loader import scenario_from_dict
from moesim.system import build_system

SERVING: dict[str, Any] = {
    "name": "store",
    "seed": 3,
    "cluster": "dgx-h100",
    "model": "mixtral-8x7b",
    "routing": {"kind": "zipf", "s": 1.0},
    "parallelism": {"dp": 8, "ep": 8},
    "policies": {"capacity_factor": 1.25, "overflow": "drop"},
    "workload": {
        "kind": "serving",
        "duration_s": 2.0,
        "arrival": {"kind": "poisson", "rate_per_s": 20.0},
        "prompt_tokens": {"kind": "constant", "value": 256},
        "output_tokens": {"kind": "constant", "value": 16},
    },
}


def _scenario(**over: Any) -> Any:
    return scenario_from_dict({**SERVING, **over})


def test_a_stored_bucket_is_read_back_exactly_without_simulating(tmp_path: Path) -> None:
    """A second cost of the same layer reads every bucket the first priced (no layer
    simulation), with the same figures to the last bit; the run's summary is identical."""
    with store_in(tmp_path):
        first = moesim.run(_scenario()).summary
        files = sorted(tmp_path.rglob("*.npz"))
        assert files, "the first run stores its buckets"
        cost = simulated_layer_cost(build_system(_scenario()))
        calls: list[int] = []
        real = cost.simulate
        cost.simulate = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
        tokens = [int(f.stem) for f in files]
        kept = [cost._at(t) for t in tokens]  # the stored buckets themselves
        assert calls == []
        second = moesim.run(_scenario()).summary
    fresh = simulated_layer_cost(build_system(_scenario()))
    assert fresh.store is None  # outside the block: memory only
    for t, k in zip(tokens, kept):
        priced = fresh._at(t)
        assert (k.time_s, k.dropped_fraction, k.comm_s) == (
            priced.time_s,
            priced.dropped_fraction,
            priced.comm_s,
        )
        assert k.link_bytes is not None and np.array_equal(k.link_bytes, priced.link_bytes)
    first.pop("wall_s", None), second.pop("wall_s", None)
    first.pop("sim_seconds_per_wall_second", None), second.pop("sim_seconds_per_wall_second", None)
    assert first == second


def test_the_key_follows_the_layer_inputs_only() -> None:
    """The arrival rate does not change the key (a rate sweep shares buckets); the routing,
    the seed, the capacity factor or the number of samples do."""
    base = layer_key(_scenario(), 3)
    rate = {**SERVING["workload"], "arrival": {"kind": "poisson", "rate_per_s": 40.0}}
    assert layer_key(_scenario(workload=rate), 3) == base
    assert layer_key(_scenario(routing={"kind": "uniform"}), 3) != base
    assert layer_key(_scenario(seed=4), 3) != base
    assert layer_key(_scenario(policies={"capacity_factor": 2.0, "overflow": "drop"}), 3) != base
    assert layer_key(_scenario(), 5) != base


def test_unreadable_or_missing_buckets_are_priced_again(tmp_path: Path) -> None:
    """A damaged file is not an error: the bucket is simulated (and stored again)."""
    store = LayerCostStore(tmp_path)
    key = layer_key(_scenario(), 3)
    assert store.get(key, 64) is None
    (tmp_path / key).mkdir()
    (tmp_path / key / "64.npz").write_bytes(b"not a numpy file")
    assert store.get(key, 64) is None
    with store_in(tmp_path):
        cost = simulated_layer_cost(build_system(_scenario()))
        t = cost.time_s(64)
    again = store.get(key, 64)
    assert again is not None and again.time_s == t


def test_the_environment_names_the_default_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cost_store.ENV_VAR, str(tmp_path))
    store = cost_store.default_store()
    assert store is not None and store.folder == tmp_path
    with store_in(None):
        assert cost_store.default_store() == store  # None keeps what is set
    monkeypatch.delenv(cost_store.ENV_VAR)
    assert cost_store.default_store() is None


def test_a_sweep_keeps_its_buckets_beside_its_points(tmp_path: Path) -> None:
    """The points of a sweep share one store in the sweep's folder; a rate sweep prices
    each bucket once."""
    import yaml

    from moesim.sweep.runner import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(SERVING))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "rates",
                "base": "base.yaml",
                "grid": {"workload.arrival.rate_per_s": [10.0, 20.0]},
                "metrics": ["throughput_tokens_per_s"],
            }
        )
    )
    result = run_sweep(sweep, workers=1, out=tmp_path / "out")
    assert result.ran == 2
    stored = list((result.folder / "cost-cache").rglob("*.npz"))
    assert stored and len({f.parent for f in stored}) == 1  # one layer, one key


def test_a_replayed_trace_keys_by_its_bytes(tmp_path: Path) -> None:
    """The same trace path with other contents is another layer (no stale buckets)."""
    import shutil

    trace = tmp_path / "t.jsonl"
    shutil.copy("scenarios/traces/mixtral-l8-h200.decode.jsonl", trace)
    from moesim.loader import load_scenario

    scenario = load_scenario(
        "scenarios/mixtral-offload-decode-h200.yaml",
        [f"routing.path={trace}"],
        allow_paths=(str(tmp_path),),
    )
    before = layer_key(scenario, 3)
    assert layer_key(scenario, 3) == before
    trace.write_bytes(trace.read_bytes() + b"\n")
    assert layer_key(scenario, 3) != before
