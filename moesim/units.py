"""Units and element widths, in one place: bytes per element of each dtype, GiB versus GB,
and the rates and times the rest of moesim converts between.

Naming rule (every config field and summary key): a unit suffix says what a number is:
``_gbps`` is 10**9 bytes per second (vendors' GB/s), ``_gib`` is 2**30 bytes (memory
capacities), ``_gb`` 10**9 bytes, ``_s``/``_ms``/``_us`` seconds, milli- and microseconds,
``_w`` watts, ``_j`` joules, ``_pj_per_bit`` picojoules per bit. In code, quantities are SI
(bytes, seconds, bytes per second) and convert only at the edges, with these constants.
"""

from __future__ import annotations

from typing import Literal

Dtype = Literal["fp8", "bf16", "fp16", "fp32"]

BYTES_PER_ELEMENT: dict[str, int] = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
"""Storage width of one element of each dtype."""

BF16_BYTES = BYTES_PER_ELEMENT["bf16"]
"""Mixed-precision training keeps weights, gradients and activations in bf16."""

DISPATCH_BYTES: dict[str, int] = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per activation element an MoE dispatch sends, by model dtype: fp8 models dispatch
in fp8 (DeepSeek-V3 report, Sec. 3.3); others in their own dtype."""

COMBINE_BYTES: dict[str, int] = {"fp8": 2, "bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per activation element an MoE combine returns: fp8 models combine in bf16
(DeepSeek-V3 report, Sec. 3.3); others in their own dtype."""

GIB = 2**30
"""Bytes in a GiB (memory capacities: ``memory_gib``)."""

GB = 10**9
"""Bytes in a GB (link rates: ``bandwidth_gbps`` is GB/s)."""

US = 1e-6
"""Seconds in a microsecond (``latency_us``, ``alpha_us``)."""

MS = 1e-3
"""Seconds in a millisecond (summaries' ``_ms`` figures)."""


def gbps(bandwidth_gbps: float) -> float:
    """A ``_gbps`` figure (GB/s) in bytes per second."""
    return bandwidth_gbps * GB
