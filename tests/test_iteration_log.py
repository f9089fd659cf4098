"""The serving loop's per-iteration log: the same values as a list of rows, in chunks."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.engine import iteration_log
from moesim.engine.iteration_log import IterationLog


@pytest.mark.parametrize("n", [0, 1, 6, 7, 20])
def test_columns_equal_the_rows_across_chunk_boundaries(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(iteration_log, "CHUNK_ROWS", 3)
    rng = np.random.default_rng(n)
    rows = [tuple(rng.random(4).tolist()) for _ in range(n)]
    kv = [rng.integers(0, 100, 2).tolist() for _ in range(n)]
    log = IterationLog(4, 2)
    for r, k in zip(rows, kv):
        log.append(r, k)
    assert len(log) == n
    cols, used = log.columns()
    expected = np.array(rows, dtype=float).reshape(-1, 4)
    assert len(cols) == 4
    for j, c in enumerate(cols):
        assert c.dtype == np.float64 and np.array_equal(c, expected[:, j])
    assert used.dtype == np.int64 and used.shape == (n, 2)
    assert np.array_equal(used, np.array(kv, dtype=np.int64).reshape(-1, 2))
    assert len(log) == 0  # handed over
