"""Per-run random streams: one independent numpy Generator per purpose, derived from the seed.

No module-global random state is used anywhere in moesim. A stream is named by purpose
(``"routing"``, ``"arrivals"``...), so adding a new consumer never shifts another's draws.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, purpose: str, *index: int) -> np.random.Generator:
    """The generator for ``purpose`` (and optional sub-indices such as a layer) of a run."""
    key = (zlib.crc32(purpose.encode("utf-8")), *index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
