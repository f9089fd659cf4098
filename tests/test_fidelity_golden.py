"""Golden fidelity: the shipped GPU profiles, with the simulator's own layer workload,
reproduce the measured held-out H100/H200 MoE layers as docs/fidelity.md reports.

Source: moesim/catalog/measurements/h100_sxm_torch_layers.jsonl and h200_torch_layers.jsonl
(real bf16 MoE layers measured on an H100 SXM and an H200 on 2026-11-22 with
`python3 -m moesim.calibrate.torch_bench`). The calibration model (olmoe-1b-7b) is
excluded, so every row is a shape the profile was not fitted on.
"""

from __future__ import annotations

from importlib import resources

import pytest

from moesim.calibrate import fidelity
from moesim.calibrate.records import of_kind, read
from moesim.catalog.hardware import accelerator

CASES = [
    ("h100-sxm", "h100_sxm_torch_layers.jsonl", "single-h100"),
    ("h200-sxm", "h200_torch_layers.jsonl", "single-h200"),
]


def _measured(name: str) -> list[dict]:
    path = resources.files("moesim.catalog") / "measurements" / name
    return read(str(path))


@pytest.mark.parametrize("acc", [c[0] for c in CASES])
def test_shipped_profiles_are_the_catalog_default(acc: str) -> None:
    """h100-sxm and h200-sxm carry their measured profile, from the measurement file."""
    spec = accelerator(acc)
    assert spec.profile is not None and spec.profile.backend == "torch"
    assert "measurements/" in spec.profile.source and "2026-11-22" in spec.profile.source


#: median |error| bounds: docs/fidelity.md reports 4.2-5.8% since the launch-pipeline
#: layer model (2026-12-03; 7.5-11.7% before, against the issue's 10% target); 7% pins that
#: result so a regression shows.
BOUNDS = {
    ("h100-sxm", "grouped_mm (eager)"): 0.07,
    ("h100-sxm", "grouped_mm (graph)"): 0.07,
    ("h200-sxm", "grouped_mm (eager)"): 0.07,
    ("h200-sxm", "grouped_mm (graph)"): 0.07,
}


@pytest.mark.slow  # simulates a few hundred measured layers, three seeds each (~13 s each)
@pytest.mark.parametrize(("acc", "file", "cluster"), CASES)
def test_grouped_layers_within_target_median(acc: str, file: str, cluster: str) -> None:
    """Grouped-GEMM layers (eager and CUDA graph) are predicted within their median bound."""
    records = [
        r for r in _measured(file) if r.get("kind") != "moe_layer" or r.get("impl") == "grouped_mm"
    ]
    profile = accelerator(acc).profile
    assert profile is not None
    rows = fidelity.compare(
        records, profile, backend="torch", cluster=cluster, exclude_models=("olmoe-1b-7b",)
    )
    models = {r.model for r in rows}
    assert "olmoe-1b-7b" not in models and len(models) >= 6
    for impl in ("grouped_mm (graph)", "grouped_mm (eager)"):
        st = fidelity.stats([r for r in rows if r.impl == impl])
        assert st.n >= 100
        assert st.median_abs <= BOUNDS[(acc, impl)], (impl, st)


def test_measurements_were_checked_against_a_dense_reference() -> None:
    """Every measured GPU layer implementation matched a dense float32 reference."""
    for _, file, _ in CASES:
        checks = of_kind(_measured(file), "check")
        assert len(checks) >= 8 and all(c["ok"] for c in checks)
