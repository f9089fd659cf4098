"""Validation: capacity-padded MoE layers measured on an H200, held out.

``moesim/catalog/measurements/h200_torch_training_2026-12-03.jsonl``, records of kind
``padded_layer`` (``python3 -m moesim.calibrate.torch_train``, torch 2.11, bf16, eager,
forward): Switch-style layers of switch-base-128 and mixtral-8x7b at 2048-32768 tokens,
groups of 512 / 1024 / 2048 tokens, capacity factors 1.0 / 1.25 / 2.0 (one-hot dispatch
mask from a cumulative sum over the one-hot expert choice, dispatch einsum into
``[E, g x C, d]``, ``bmm`` experts over every slot, combine einsum). Nothing in moesim was
fitted on them: moesim simulates each with the shipped H200 profile, ``expert_compute:
padded`` and ``mask_build: eager`` (the harness builds its masks op by op). Results and
the misses are in docs/fidelity.md, "Capacity-padded experts".
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from moesim.cost.padded import PaddedExperts
from moesim.engine.layer_sim import simulate_layer
from moesim.loader import load_scenario
from moesim.system import build_system

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "moesim" / "catalog" / "measurements" / "h200_torch_training_2026-12-03.jsonl"
BASE = """\
name: padded-h200
seed: 1
cluster: single-h200
model: switch-base-128
routing: {kind: uniform}
parallelism: {dp: 1, ep: 1}
policies: {capacity_factor: 1.0, overflow: drop}
workload: {kind: layer, tokens: 1024}
"""


def _records() -> list[dict]:
    lines = MEASURED.read_text("utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r.get("kind") == "padded_layer" and r["form"] == "padded"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("padded") / "base.yaml"
    path.write_text(BASE)
    return path


@cache
def _predicted_ms(base: Path, model: str, tokens: int, cf: float, group: int) -> float:
    overrides = [
        f"model={model}",
        f"workload.tokens={tokens}",
        "policies.expert_compute=padded",
        "policies.mask_build=eager",
        f"policies.capacity_factor={cf}",
        f"policies.group_size={group}",
    ]
    system = build_system(load_scenario(base, overrides))
    return simulate_layer(system).time_s * 1e3


def _error(base: Path, r: dict) -> float:
    key = (r["model"], r["tokens"], r["capacity_factor"], r["group_size"])
    return _predicted_ms(base, *key) / r["fwd_ms"] - 1.0


def test_the_records_are_the_ones_documented() -> None:
    """27 padded layers (18 Switch-Base, 9 Mixtral), capacities as moesim computes them."""
    rows = _records()
    assert len(rows) == 27
    assert sum(r["model"] == "mixtral-8x7b" for r in rows) == 9
    for r in rows:
        lay = PaddedExperts(r["capacity_factor"], r["group_size"], r["experts"], r["top_k"])
        assert lay.groups(r["tokens"]).capacity == r["capacity"]


def test_mixtral_layers_from_8192_tokens_within_15_percent(base: Path) -> None:
    """Where the device is busy with the layer's work (Mixtral-8x7B experts, 8192 and
    32768 tokens), every held-out padded layer is within 15% (measured: -12% to +4%)."""
    errs = [
        _error(base, r) for r in _records() if r["model"] == "mixtral-8x7b" and r["tokens"] >= 8192
    ]
    assert len(errs) == 6
    assert max(abs(e) for e in errs) <= 0.15


def test_trend_over_the_capacity_factor(base: Path) -> None:
    """In every series (model, tokens, group size), moesim's time grows from CF 1.0 to
    2.0 where the measured one does, and its CF 2.0 / CF 1.0 growth is within 25% of the
    measured growth."""
    series: dict[tuple, dict[float, dict]] = {}
    for r in _records():
        series.setdefault((r["model"], r["tokens"], r["group_size"]), {})[r["capacity_factor"]] = r
    assert len(series) == 9
    for (model, tokens, group), by_cf in series.items():
        measured = by_cf[2.0]["fwd_ms"] / by_cf[1.0]["fwd_ms"]
        predicted = _predicted_ms(base, model, tokens, 2.0, group) / _predicted_ms(
            base, model, tokens, 1.0, group
        )
        assert predicted > 1.0
        assert predicted / measured == pytest.approx(1.0, abs=0.25), (model, tokens, group)


@pytest.mark.xfail(
    strict=True,
    reason="missed: Switch-Base layers (128 experts of few rows each) are 24-44% under, "
    "as the grouped reference layers of the same shapes are (21-39%); the sequential "
    "cumulative sum and the broadcast mask kernels of eager PyTorch are not modelled "
    "(docs/fidelity.md)",
)
def test_every_held_out_padded_layer_within_15_percent(base: Path) -> None:
    """The issue's target on every record."""
    assert max(abs(_error(base, r)) for r in _records()) <= 0.15
