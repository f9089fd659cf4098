"""Per-iteration rows of a serving run, kept as columns of numpy chunks.

A serving loop appends one row per iteration (a tuple of floats) and the KV blocks each
rank uses; a simulated day is millions of iterations. Python tuples cost ~0.8 KB per
iteration, so rows are gathered in a short list and moved, every :data:`CHUNK_ROWS`
rows, into one float64 array per column (and one int64 array for the KV columns): 8 bytes
per value. :meth:`IterationLog.columns` joins each column's chunks, releasing them column
by column, so the finished records never need twice their size. The values are those of
``np.array(rows, dtype=float)``, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHUNK_ROWS = 16_384
"""Rows gathered in Python before they move into the column arrays."""


class IterationLog:
    """Rows of ``width`` floats plus ``kv_width`` integers per iteration."""

    def __init__(self, width: int, kv_width: int) -> None:
        self.width, self.kv_width = width, kv_width
        self._rows: list[tuple[float, ...]] = []
        self._kv: list[Sequence[int]] = []
        self._columns: list[list[np.ndarray]] = [[] for _ in range(width)]
        self._kv_chunks: list[np.ndarray] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, row: tuple[float, ...], kv: Sequence[int]) -> None:
        """One iteration's row and its per-rank KV figures."""
        self._rows.append(row)
        self._kv.append(kv)
        self._count += 1
        if len(self._rows) >= CHUNK_ROWS:
            self._move()

    def _move(self) -> None:
        if not self._rows:
            return
        block = np.array(self._rows, dtype=float).reshape(-1, self.width)
        for j, parts in enumerate(self._columns):
            parts.append(block[:, j].copy())
        self._kv_chunks.append(np.array(self._kv, dtype=np.int64).reshape(-1, self.kv_width))
        self._rows, self._kv = [], []

    def columns(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Every column (float64, one per row field) and the KV figures (int64, iterations
        x kv_width); the log is empty afterwards."""
        self._move()
        out = []
        for j in range(self.width):
            parts, self._columns[j] = self._columns[j], []
            out.append(np.concatenate(parts) if parts else np.zeros(0))
        kv = (
            np.concatenate(self._kv_chunks)
            if self._kv_chunks
            else np.zeros((0, self.kv_width), dtype=np.int64)
        )
        self._kv_chunks = []
        self._count = 0
        return out, kv
