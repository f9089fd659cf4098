"""Constants shared by the PyTorch harness modules."""

from __future__ import annotations

import time
from pathlib import Path

SECTIONS = ("launch", "memory", "gemm", "grouped", "layers")
CATALOG = Path(__file__).resolve().parent.parent / "catalog" / "data" / "models.yaml"
ROUTER_SCALE = 1e-4  # keeps the router GEMM real while the Gumbel bias decides the routing
WEIGHT_STD = 0.02
MEM_FRACTION = 0.45  # routed-expert weights must fit in this share of device memory
GEMM_MAX_BYTES = 8 << 30
CHECK_TOKENS = 32
CHECK_TOL = 1e-2
GATED = ("swiglu", "geglu")

_T0 = time.perf_counter()
