"""Validation: the Switch Transformer's throughput against the capacity factor.

Fedus, Zoph, Shazeer 2021, "Switch Transformers" (arXiv:2101.03961, JMLR 23), Table 1:
Switch-Base (128 experts at every other FFN) on 32 TPU v3 cores, 1000 / 910 / 860
examples/s at capacity factors 1.0 / 1.25 / 2.0. moesim's shipped scenario
``scenarios/switch-base-tpu-v3-capacity.yaml`` runs that model with capacity-padded
experts (Mesh-TF groups of 1024 tokens) on datasheet TPU v3 rates; the issue's target is
the published ratios to CF 1.0 within 3 points. See docs/fidelity.md, "Capacity-padded
experts", for the comparison and why the CF 2.0 point is missed.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

import moesim
from moesim.loader import load_scenario

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "switch-base-tpu-v3-capacity.yaml"
PUBLISHED_EXAMPLES_PER_S = {1.0: 1000.0, 1.25: 910.0, 2.0: 860.0}
"""Switch Transformer, Table 1, rows Switch-Base, column Speed (examples/sec)."""
POINTS = 0.03


@cache
def _step_ms(cf: float, compute: str = "padded") -> float:
    overrides = [f"policies.capacity_factor={cf}", f"policies.expert_compute={compute}"]
    if compute == "grouped":
        overrides.append("policies.group_size=null")
    return float(moesim.run(load_scenario(SCENARIO, overrides)).summary["step_time_ms"])


def _ratio(cf: float, compute: str = "padded") -> float:
    """Throughput at ``cf`` over throughput at 1.0 (the same examples per step)."""
    return _step_ms(1.0, compute) / _step_ms(cf, compute)


def _published(cf: float) -> float:
    return PUBLISHED_EXAMPLES_PER_S[cf] / PUBLISHED_EXAMPLES_PER_S[1.0]


def test_throughput_falls_with_the_capacity_factor_by_padding() -> None:
    """Padded experts make the capacity factor cost step time, as published; grouped
    experts (kept tokens only) stay within 2% of flat, the miss the issue reported."""
    assert _ratio(1.25) < 1.0 and _ratio(2.0) < _ratio(1.25)
    assert all(abs(_ratio(cf, "grouped") - 1.0) < 0.02 for cf in (1.25, 2.0))


@pytest.mark.xfail(
    strict=True,
    reason="missed: padding makes step time affine in the capacity factor, and no affine "
    "time matches both published ratios within 3 points (docs/fidelity.md)",
)
def test_both_published_ratios_within_3_points() -> None:
    """The issue's target: CF 1.25 / CF 1.0 (published 0.910) and CF 2.0 / CF 1.0
    (published 0.860) both within 3 points."""
    assert all(abs(_ratio(cf) - _published(cf)) <= POINTS for cf in (1.25, 2.0))


def test_each_ratio_within_ten_points() -> None:
    """The best any affine step time can do is 3.8 points on the worse of the two ratios
    (u = 0.22, below). Since the training backward runs the expert products over every
    padded row (twice) and a third einsum, as measured padded steps on an H200 grow
    (docs/fidelity.md), moesim's padded share is u = 0.29: 2.3 and 8.3 points off. This
    fails if the padded share drifts further from what the published figures allow."""
    assert all(abs(_ratio(cf) - _published(cf)) <= 0.10 for cf in (1.25, 2.0))


def test_no_affine_step_time_meets_both_published_ratios() -> None:
    """Why the CF 2.0 check fails: with step time a + b x cf, the share u = b / (a + b)
    gives ratios 1 / (1 + 0.25 u) and 1 / (1 + u); within 3 points of 0.91 needs
    u >= 0.255, within 3 points of 0.86 needs u <= 0.205. moesim's step time is affine
    in the capacity factor (checked here to 0.5%)."""
    need_low = (1 / (_published(1.25) + POINTS) - 1) / 0.25
    need_high = 1 / (_published(2.0) - POINTS) - 1
    assert need_low > need_high
    a_plus_b = _step_ms(1.0)
    b = (_step_ms(2.0) - _step_ms(1.0)) / 1.0
    assert _step_ms(1.25) == pytest.approx(a_plus_b + 0.25 * b, rel=0.005)
