"""The host-side cost of an eager expert-parallel layer, fitted on measured EP layers.

``python3 -m moesim.calibrate.torch_ep`` times whole expert-parallel MoE layers on the
GPUs of one host. At small token counts their time is nearly flat (~2 ms on H200s at 16 to
256 tokens per rank) and far above what the kernels and collectives cost: an eager EP
layer reads its all-to-all split sizes on the host (a blocking synchronisation), so the
launches that follow are no longer hidden behind the GPU's work. The fit is the median,
over the measured layers of at most ``max_tokens`` tokens per rank, of measured minus
simulated time with no such overhead (the same shape simulated by moesim's ``layer``
workload: uniform routing, dropless, per-expert products, eager launches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def simulated_ms(record: dict[str, Any], cluster: str, overhead_us: float | None) -> float:
    """moesim's time for a measured EP layer (``overhead_us`` replaces the profile's; None
    keeps it)."""
    from moesim.api import run
    from moesim.catalog.hardware import accelerator
    from moesim.loader import scenario_from_dict

    world, tokens = int(record["world"]), int(record["tokens_per_rank"])
    data: dict[str, Any] = {
        "name": "ep-layer",
        "seed": 1,
        "cluster": {
            "preset": cluster,
            "accelerators_per_node": world,
            "expert_kernel": "loop",
            "launch": "eager",
        },
        "model": {
            "preset": "mixtral-8x7b",
            "experts": int(record["experts"]),
            "top_k": int(record["top_k"]),
            "d_model": int(record["d_model"]),
            "expert_d_ff": int(record["d_ff"]),
        },
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": world, "ep": world},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {"kind": "layer", "tokens": tokens * world},
    }
    s = scenario_from_dict(data)
    profile = s.cluster.profile or s.cluster.accelerator.profile
    if profile is not None and overhead_us is not None:
        patched = profile.model_copy(update={"ep_host_overhead_us": overhead_us})
        acc = accelerator(s.cluster.accelerator.name).model_copy(update={"profile": patched})
        s = s.model_copy(update={"cluster": s.cluster.model_copy(update={"accelerator": acc})})
    return float(run(s).summary["time_ms"])


def ep_host_overhead_us(
    records: Sequence[dict[str, Any]], cluster: str, max_tokens: int = 256
) -> float:
    """Median of (measured - simulated without the overhead) over the small layers, us."""
    small = [
        r for r in records if r.get("kind") == "ep_layer" and r["tokens_per_rank"] <= max_tokens
    ]
    if not small:
        raise ValueError(f"no EP layer of at most {max_tokens} tokens per rank")
    residual = [r["ms"] - simulated_ms(r, cluster, 0.0) for r in small]
    return float(np.median(residual)) * 1e3
