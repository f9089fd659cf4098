"""Where offloaded experts live and how fast they come back: host DRAM (pinned or pageable,
from measured H100 copies) and NVMe, as per-tier latency and bandwidth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from moesim.config.scenario import Scenario
from moesim.derived.serving_memory import (
    devices_per_host,
)
from moesim.topology.graph import rate
from moesim.units import GB, US

if TYPE_CHECKING:
    pass

MEASUREMENTS = "h100_sxm_primitives.jsonl"
"""The catalog measurement file with pinned and pageable host-to-device copies."""


@cache
def pageable_fraction() -> float:
    """Pageable / pinned host-to-device copy rate: the ratio of the largest measured copies
    of each kind in ``moesim/catalog/measurements/h100_sxm_primitives.jsonl`` (1 GiB:
    19.06 / 54.88 GB/s = 0.347 on an H100's PCIe Gen5 x16)."""
    path = resources.files("moesim.catalog") / "measurements" / MEASUREMENTS
    best: dict[str, tuple[int, float]] = {}
    for line in path.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") != "h2d":
            continue
        mem, size = str(rec["mem"]), int(rec["bytes"])
        if mem not in best or size > best[mem][0]:
            best[mem] = (size, float(rec["gbps"]))
    return best["pageable"][1] / best["pinned"][1]


@dataclass(frozen=True)
class TierRates:
    """Copy rates into one device's HBM, bytes/s, and the per-copy latency, s."""

    dram_bps: float
    nvme_bps: float
    latency_s: float


def tier_rates(s: Scenario, host_memory: str = "pinned") -> TierRates:
    """Per-device DRAM -> HBM and NVMe -> HBM rates (see the module docstring)."""
    acc = s.cluster.accelerator
    if acc.host_link is None:
        raise ValueError(f"{acc.name} has no host_link: offloading needs one")
    link = s.cluster.link_spec(acc.host_link)
    share = devices_per_host(s.cluster)
    pcie = rate(link) * (pageable_fraction() if host_memory == "pageable" else 1.0)
    host = s.cluster.host
    dram = min(pcie, host.dram_bandwidth_gbps / share)
    nvme = min(dram, host.nvme_read_gbps / share)
    return TierRates(dram * GB, nvme * GB, link.latency_us * US)
