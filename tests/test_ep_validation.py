"""Whole expert-parallel MoE layers on 2 and 4 H200s against the simulator.

Source: moesim/catalog/measurements/h200x4_ep_layers_2026-11-22.jsonl, measured by
``python3 -m moesim.calibrate.torch_ep`` on one HGX H200 host (Mixtral-8x7B experts, 8
experts, top-2, 16-4096 tokens per rank, eager PyTorch + NCCL; outputs checked against a
dense layer). The H200 profile's ``ep_host_overhead_us`` is fitted on the 4-GPU layers of
at most 256 tokens per rank; the 2-GPU layers are held out.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from moesim.calibrate.ep_fit import ep_host_overhead_us, simulated_ms
from moesim.catalog.hardware import accelerator

FILE = resources.files("moesim.catalog") / "measurements" / "h200x4_ep_layers_2026-11-22.jsonl"


@pytest.fixture(scope="module")
def layers() -> list[dict]:
    rows = [json.loads(line) for line in FILE.read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "ep_layer"]


def test_profile_value_is_reproduced_from_the_file(layers: list[dict]) -> None:
    fitted = ep_host_overhead_us([r for r in layers if r["world"] == 4], "dgx-h200")
    profile = accelerator("h200-sxm").profile
    assert profile is not None and profile.ep_host_overhead_us is not None
    assert fitted == pytest.approx(profile.ep_host_overhead_us, rel=0.01)


@pytest.mark.parametrize(("world", "bound"), [(2, 0.20), (4, 0.22)])
def test_ep_layers_within_their_bounds(layers: list[dict], world: int, bound: float) -> None:
    """Every token count, 16 to 4096 per rank, within 20% (held out: world 2). Without the
    host overhead the small layers were under-predicted by 50-70%. The 4-GPU layers, whose
    small ones the overhead is fitted on, allow 22%: the overhead is a constant, and the
    measured 256-1024-token layers show it partly hidden (+18% and +21% there since the
    launch-pipeline layer model of 2026-12-03 priced the experts' products at their fitted
    device time; +16% before)."""
    rows = [r for r in layers if r["world"] == world]
    assert len(rows) == 5
    for r in rows:
        err = simulated_ms(r, "dgx-h200", None) / r["ms"] - 1
        assert abs(err) <= bound, (r["tokens_per_rank"], r["ms"], err)
    small = min(rows, key=lambda r: r["tokens_per_rank"])
    assert simulated_ms(small, "dgx-h200", 0.0) < 0.5 * small["ms"]
