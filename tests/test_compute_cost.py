"""The roofline compute cost model (moesim.cost.compute)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.catalog.hardware import accelerator
from moesim.cost.compute import Roofline

ACC = accelerator("h100-sxm").model_copy(update={"profile": None})  # the datasheet roofline
B = 2  # bf16
D_MODEL, D_FF = 4096, 14336
PEAK = ACC.peak_tflops.bf16 * 1e12 * ACC.efficiency.compute  # achievable FLOP/s
BW = ACC.memory_bandwidth_gbps * 1e9 * ACC.efficiency.memory  # achievable bytes/s
OVERHEAD = ACC.kernel_overhead_us * 1e-6


@pytest.fixture(scope="module")
def roof() -> Roofline:
    return Roofline.of(ACC, "bf16", B)


def _weight_bytes(d_model: int, d_ff: int, gated: bool) -> float:
    return B * d_model * d_ff * (3 if gated else 2)


def test_roofline_rates_from_catalog(roof: Roofline) -> None:
    """Achievable rates are datasheet peak x measured efficiency; overhead is in seconds."""
    assert roof.flops_per_s == pytest.approx(PEAK)
    assert roof.bytes_per_s == pytest.approx(BW)
    assert roof.overhead_s == pytest.approx(OVERHEAD)


def test_kernel_is_max_of_compute_and_memory(roof: Roofline) -> None:
    """A kernel takes the slower of its FLOPs and its bytes, plus one launch overhead."""
    assert roof.product_s(PEAK * 1e-3, BW * 1e-4) == pytest.approx(1e-3 + OVERHEAD)
    assert roof.product_s(PEAK * 1e-4, BW * 1e-3) == pytest.approx(1e-3 + OVERHEAD)
    assert roof.memory_s(BW * 2e-3) == pytest.approx(2e-3 + OVERHEAD)


def test_gemm_cost(roof: Roofline) -> None:
    """A large square GEMM is compute bound: 2mkn / achievable FLOP/s + overhead."""
    m = k = n = 8192
    assert float(roof.gemm_s(m, k, n)) == pytest.approx(2 * m * k * n / PEAK + OVERHEAD)
    # a matrix-vector product is memory bound: it streams the k x n weight
    assert float(roof.gemm_s(1, k, n)) == pytest.approx(
        B * (k + k * n + n) / BW + OVERHEAD, rel=1e-9
    )


@pytest.mark.parametrize("gated", [True, False])
def test_one_token_is_memory_bound(roof: Roofline, gated: bool) -> None:
    """One token through one expert costs ~ its weight bytes / achievable bandwidth + 3 launches."""
    t = roof.grouped_ffn_s(np.array([1]), D_MODEL, D_FF, "swiglu" if gated else "gelu")
    expected = _weight_bytes(D_MODEL, D_FF, gated) / BW + 3 * OVERHEAD
    assert t == pytest.approx(expected, rel=1e-3)
    # and far above the compute-bound estimate
    flops = 2 * D_MODEL * D_FF * (3 if gated else 2)
    assert t > 100 * flops / PEAK


def test_one_token_on_each_of_n_experts_streams_n_weights(roof: Roofline) -> None:
    """n experts with a token each stream n experts' weights (launches stay 3, grouped)."""
    n = 8
    t = roof.grouped_ffn_s(np.ones(n), D_MODEL, D_FF, "swiglu")
    expected = n * _weight_bytes(D_MODEL, D_FF, "swiglu") / BW + 3 * OVERHEAD
    assert t == pytest.approx(expected, rel=1e-3)


def test_many_tokens_are_compute_bound(roof: Roofline) -> None:
    """A huge batch costs ~ FLOPs / achievable FLOP/s (the activation pass adds a few %)."""
    tokens = 1_000_000
    t = roof.grouped_ffn_s(np.array([tokens]), D_MODEL, D_FF, "swiglu")
    gemm_flops = 2 * tokens * D_MODEL * (2 * D_FF) + 2 * tokens * D_FF * D_MODEL
    compute = gemm_flops / PEAK
    act_bytes = B * tokens * (2 * D_FF + D_FF)  # read gate+up, write the product
    assert t == pytest.approx(compute + act_bytes / BW + 3 * OVERHEAD, rel=1e-6)
    assert compute <= t <= 1.1 * compute
    # memory-only estimate of the GEMMs is far smaller: the GEMMs really are compute bound
    weight_and_io = B * tokens * (D_MODEL + 2 * D_FF + D_FF + D_MODEL)
    assert weight_and_io / BW < 0.2 * compute


def test_zero_token_experts_cost_nothing(roof: Roofline) -> None:
    """Experts without tokens add no time: their weights are not read; all-empty costs 0."""
    one = roof.grouped_ffn_s(np.array([5]), D_MODEL, D_FF, "swiglu")
    padded = roof.grouped_ffn_s(np.array([0, 5, 0, 0, 0, 0, 0]), D_MODEL, D_FF, "swiglu")
    assert padded == pytest.approx(one, rel=1e-12)
    assert roof.grouped_ffn_s(np.zeros(16), D_MODEL, D_FF, "swiglu") == 0.0
    assert roof.grouped_ffn_s(np.array([], dtype=int), D_MODEL, D_FF, "swiglu") == 0.0
    assert roof.dense_ffn_s(0, D_MODEL, D_FF, "swiglu") == 0.0
    assert roof.dense_ffn_s(10, D_MODEL, 0, "swiglu") == 0.0


def test_dense_ffn_is_one_expert(roof: Roofline) -> None:
    """A dense FFN of n tokens costs the same as one expert holding n tokens."""
    assert roof.dense_ffn_s(64, D_MODEL, D_FF, "gelu") == pytest.approx(
        roof.grouped_ffn_s(np.array([64]), D_MODEL, D_FF, "gelu")
    )


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 20000), min_size=1, max_size=16),
    extra=st.integers(1, 20000),
    where=st.integers(0, 15),
    gated=st.booleans(),
)
def test_time_non_decreasing_in_tokens(
    roof: Roofline, counts: list[int], extra: int, where: int, gated: bool
) -> None:
    """Giving any expert more tokens never makes the grouped FFN faster."""
    base = np.array(counts)
    more = base.copy()
    more[where % len(base)] += extra
    t0 = roof.grouped_ffn_s(base, 1024, 2816, "swiglu" if gated else "gelu")
    t1 = roof.grouped_ffn_s(more, 1024, 2816, "swiglu" if gated else "gelu")
    assert t1 >= t0
    assert t0 >= 0
    if base.any():
        assert t0 >= 3 * OVERHEAD
