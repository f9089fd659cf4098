"""DeepEP's kernels as cost inputs: the bytes each token carries and the two constants its
README does not publish (a kernel's fixed time and the share of the NIC's rate it reaches).

Source: github.com/deepseek-ai/DeepEP, README "Performance" (normal kernels: commit
3b1045d, 2025-04-22; low-latency kernels: commit de8cfca, 2025-06-05, after "low-latency
kernels now leverage NVLink as much as possible", #173), on H800 (~160 GB/s NVLink) with
one CX7 InfiniBand 400 Gb/s NIC per GPU (~50 GB/s); the byte widths are those of its
tests (``tests/test_internode.py``, ``tests/test_low_latency.py`` at those commits).
The fit and its held-out check: ``docs/fidelity/deepep.md``
(``python -m moesim.calibrate.deepep_fit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.parallelism import DeepEPMode
from moesim.units import US

FP8_SCALE_BYTES_PER_128 = 4
"""FP8 dispatch carries one fp32 scale per 128 channels (DeepEP tests: ``hidden / 128 * 4``
bytes per token beside the ``hidden`` fp8 bytes)."""
LOW_LATENCY_HEADER_BYTES = 16
"""Per-message metadata of a low-latency dispatch (DeepEP ``test_low_latency.py``:
``hidden + hidden / 128 * 4 + 16`` bytes per (token, expert))."""
COMBINE_ELEMENT_BYTES = 2
"""DeepEP combines in BF16 (both kernel families)."""


@dataclass(frozen=True)
class DeepEPKernel:
    """One DeepEP kernel family's unpublished constants (fitted, see the module doc)."""

    mode: DeepEPMode
    dispatch_latency_s: float
    """Fixed time of one dispatch call on top of its wire time (launch, signalling, the
    receivers' polling), added to every message's arrival."""
    combine_latency_s: float
    """Same for one combine call (with its reduction)."""
    rdma_efficiency: float
    """Share of the NIC's per-direction rate the kernel's RDMA traffic achieves (the NIC
    links' capacity is multiplied by it while the kernel's legs cross them)."""
    source: str


LOW_LATENCY = DeepEPKernel(
    mode="low_latency",
    dispatch_latency_s=18.75 * US,
    combine_latency_s=20.62 * US,
    rdma_efficiency=0.8891,
    source="fitted (python -m moesim.calibrate.deepep_fit --fit, least squares on the "
    "relative error) on DeepEP README low-latency rows EP16 and EP128, dispatch and combine "
    "(commit de8cfca, 2025-06-05, H800 + CX7 400 Gb/s); held out: EP8, EP32, EP64, EP256 "
    "(docs/fidelity/deepep.md)",
)
NORMAL = DeepEPKernel(
    mode="normal",
    dispatch_latency_s=LOW_LATENCY.dispatch_latency_s,
    combine_latency_s=LOW_LATENCY.combine_latency_s,
    rdma_efficiency=0.8766,
    source="rdma_efficiency fitted (python -m moesim.calibrate.deepep_fit --fit) on DeepEP "
    "README normal-kernel row EP32, dispatch and combine (commit 3b1045d, 2025-04-22, H800 + "
    "CX7 400 Gb/s); held out: EP8 (intranode), EP16, EP64; the latencies are the "
    "low-latency kernels' (the published ~2 ms calls cannot identify them) "
    "(docs/fidelity/deepep.md)",
)


def kernel(mode: DeepEPMode) -> DeepEPKernel:
    """The constants of one kernel family."""
    return LOW_LATENCY if mode == "low_latency" else NORMAL


def dispatch_bytes_per_token(d_model: int, dtype: str, mode: DeepEPMode) -> float:
    """Bytes one token's activation takes in a dispatch message: FP8 with its per-128-channel
    scales for fp8 models (DeepEP's FP8 dispatch), else BF16; low-latency messages add their
    header. Per (token, node) and (token, GPU) in normal mode, per (token, expert) in
    low-latency mode (:mod:`moesim.engine.deepep`)."""
    if dtype == "fp8":
        nbytes = d_model + d_model / 128 * FP8_SCALE_BYTES_PER_128
    else:
        nbytes = float(d_model * COMBINE_ELEMENT_BYTES)
    return nbytes + (LOW_LATENCY_HEADER_BYTES if mode == "low_latency" else 0.0)


def combine_bytes_per_token(d_model: int) -> float:
    """Bytes one token's (partial) result takes in a combine message: BF16."""
    return float(d_model * COMBINE_ELEMENT_BYTES)
