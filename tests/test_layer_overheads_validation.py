"""Issue 11's composition targets on held-out measured layers: per-expert loops within 10%
(median) and grouped-GEMM layers below 512 tokens within 15% (median), on an H100 and an
H200.

Source: moesim/catalog/measurements/h100_sxm_torch_layers.jsonl and h200_torch_layers.jsonl
(real bf16 MoE layers on an NVIDIA H100 80GB HBM3 and an H200, torch 2.11.0+cu130, CUDA 13.0,
measured 2026-11-22 by ``python3 -m moesim.calibrate.torch_bench``). The shipped profiles'
launch pipeline was fitted on those files' primitives and on the calibration model
(olmoe-1b-7b) only, so every row checked here is held out; the profiles' values are
reproduced from the files first.
"""

from __future__ import annotations

from importlib import resources

import pytest

from moesim.calibrate import fidelity
from moesim.calibrate.commands import DEFAULT_FIT_MODELS, fit_from_records
from moesim.calibrate.records import read
from moesim.catalog.hardware import accelerator

CASES = [
    ("h100-sxm", "h100_sxm_torch_layers.jsonl", "single-h100"),
    ("h200-sxm", "h200_torch_layers.jsonl", "single-h200"),
]


def _records(name: str) -> list[dict]:
    return read(str(resources.files("moesim.catalog") / "measurements" / name))


@pytest.mark.parametrize(("acc", "file", "cluster"), CASES)
def test_shipped_launch_fit_is_reproduced_from_the_file(acc: str, file: str, cluster: str) -> None:
    """Every launch-pipeline value of the shipped profile comes out of its measurement file."""
    shipped = accelerator(acc).profile
    assert shipped is not None and shipped.launch is not None
    fitted = fit_from_records(_records(file), "test", DEFAULT_FIT_MODELS).launch
    assert fitted is not None
    for key, value in shipped.launch.model_dump(exclude={"source"}).items():
        got = fitted.model_dump()[key]
        if isinstance(value, dict):
            for k, v in value.items():
                assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-9), (key, k)
        else:
            assert got == pytest.approx(value, rel=1e-4, abs=1e-9), key


@pytest.mark.slow  # simulates ~320 measured layers, three routing seeds each (~20 s each)
@pytest.mark.parametrize(("acc", "file", "cluster"), CASES)
def test_loops_and_small_batches_meet_the_targets(acc: str, file: str, cluster: str) -> None:
    """Held-out layers: per-expert loops median <= 10%, grouped layers below 512 tokens
    median <= 15% (eager and CUDA graphs each), and the worst small grouped layer bounded
    by what docs/fidelity.md reports (45%: Switch-Base's graph replays of 1 token, first
    measurements of a model on a busy host)."""
    profile = accelerator(acc).profile
    assert profile is not None
    rows = fidelity.compare(
        _records(file), profile, backend="torch", cluster=cluster, exclude_models=("olmoe-1b-7b",)
    )
    assert "olmoe-1b-7b" not in {r.model for r in rows}
    loops = [r for r in rows if r.impl == "loop (eager)"]
    assert len(loops) >= 90
    assert fidelity.stats(loops).median_abs <= 0.10
    for impl in ("grouped_mm (eager)", "grouped_mm (graph)"):
        small = [r for r in rows if r.impl == impl and r.tokens < fidelity.SMALL_TOKENS]
        st = fidelity.stats(small)
        assert st.n >= 60
        assert st.median_abs <= 0.15 and st.worst_abs <= 0.50, (impl, st)
