"""Predict a measured MoE layer with the simulator: the scenario a measurement corresponds
to, run through moesim's own layer workload (sampled routing) or replayed with the measured
per-expert counts (for fitting)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.calibrate.records import Record, timing
from moesim.config.profile import DeviceProfile
from moesim.config.scenario import Scenario


def cluster_for(record_device: str, backend: str) -> str:
    """The single-device cluster preset a measurement ran on."""
    if backend == "numpy":
        return "single-host-cpu"
    name = record_device.upper()
    if "H200" in name:
        return "single-h200"
    if "H100" in name:
        return "single-h100"
    raise ValueError(f"no single-device cluster preset for {record_device!r}")


def scenario_for(
    rec: Record, profile: DeviceProfile, cluster: str, backend: str, seed: int = 0
) -> Scenario:
    """The moesim scenario of one measured layer (one device, all experts local, dropless)."""
    from moesim import catalog
    from moesim.config.model import ModelConfig
    from moesim.loader import scenario_from_dict

    base = ModelConfig.model_validate(catalog.raw_preset("models", rec["model"]))
    model: dict[str, Any] = {
        "preset": rec["model"],
        "d_model": rec["d_model"],
        "expert_d_ff": rec["expert_d_ff"],
        "dtype": "fp32" if backend == "numpy" else "bf16",
    }
    if base.shared_experts:
        model["shared_expert_d_ff"] = rec["shared_expert_d_ff"]
    if base.dense_d_ff is not None:
        model["dense_d_ff"] = max(1, base.dense_d_ff * rec["d_model"] // base.d_model)
    if base.attention != "mla":
        model["head_dim"] = base.head_dim_resolved
    routing = {"kind": "uniform"} if rec["routing"] == "uniform" else {"kind": "zipf", "s": 1.0}
    data = {
        "name": "fidelity",
        "seed": seed,
        "cluster": {
            "preset": cluster,
            "profile": profile.model_dump(mode="json"),
            "expert_kernel": "loop" if rec.get("impl") == "loop" else "grouped",
            "launch": timing(rec),
        },
        "model": model,
        "routing": routing,
        "parallelism": {"dp": 1, "ep": 1},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {"kind": "layer", "tokens": int(rec["tokens"])},
    }
    return scenario_from_dict(data, label=f"<measured {rec['model']} T={rec['tokens']}>")


def predict_sampled_s(scenario: Scenario) -> float:
    """The simulator's own prediction: routing sampled from the scenario's distribution."""
    from moesim.engine.layer_sim import simulate_layer
    from moesim.system import build_system

    return float(simulate_layer(build_system(scenario)).time_s)


def predict_replayed_s(scenario: Scenario, counts: list[int]) -> float:
    """The simulator's cost path on the measured per-expert counts (used for fitting)."""
    from moesim.engine.layer_sim import layer_tokens, simulate_routed_layer
    from moesim.routing.route import LayerRouting
    from moesim.system import build_system

    system = build_system(scenario)
    routing = LayerRouting(
        tokens_per_rank=np.array([layer_tokens(scenario)]),
        counts=np.array([counts], dtype=np.int64),
        dropped=0,
        rerouted=0,
        fully_dropped=0,
        capacity=None,
    )
    return float(simulate_routed_layer(system, routing).time_s)
