"""Priced MoE layer buckets kept on disk, shared by processes and runs.

A :class:`~moesim.cost.layer_cost.MoELayerCost` prices each bucket (a batch size) by
simulating a few routed layers; a long serving run does that for ~100 buckets, and every
point of a sweep, every worker process and every rerun did it again. With a store, a
bucket priced once is read back by any later cost of the same layer:

- **Key.** The layer's inputs (the resolved scenario's ``seed``, ``cluster``, ``model``,
  ``routing``, ``parallelism`` and ``policies``: everything the layer simulation reads,
  :data:`LAYER_COST_KEYS`), the number of routing samples, and a digest of moesim's own
  code and catalog (so a changed cost model never reads an old figure), and the bytes of a
  replayed routing trace. The bucket's token count names the file.
- **Exact.** A stored bucket holds the same float64 figures the simulation gave (``.npz``),
  so a run with the store gives the same summary as one without.
- **Safe.** Files are written atomically (a temporary file renamed into place): processes
  that price the same bucket at once both write the same figures, and a reader never sees
  half a file; an unreadable file is priced again.

The store is off unless a folder is given (``MOESIM_COST_CACHE``, or
:func:`use_store`; ``moesim sweep`` keeps one in its output folder for its workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

LAYER_COST_KEYS = ("seed", "cluster", "model", "routing", "parallelism", "policies")
"""The sections of a resolved scenario an MoE layer's cost depends on: runs that agree on
them (a rate sweep, another engine's host costs) price the same buckets."""

ENV_VAR = "MOESIM_COST_CACHE"
"""A folder named here turns the store on for every process that inherits it."""


@cache
def code_digest() -> str:
    """Digest of moesim's Python sources and catalog data (a bucket priced by other code
    or other catalog figures is never reused)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".yaml") and path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def layer_key(scenario: Any, samples: int) -> str:
    """The store key of a scenario's MoE layer priced with ``samples`` routing samples."""
    inputs = scenario.model_dump(mode="json", include=set(LAYER_COST_KEYS))
    # a replayed trace is named by its path: its bytes go in the key (an edited trace at the
    # same path must not read back buckets priced from the old one)
    trace = getattr(scenario.routing, "path", None)
    traced = hashlib.sha256(Path(trace).read_bytes()).hexdigest() if trace else None
    text = json.dumps(
        {"layer": inputs, "samples": samples, "code": code_digest(), "trace": traced},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StoredBucket:
    """One bucket's figures as stored (a ``LayerSample``'s fields)."""

    time_s: float
    dropped_fraction: float
    comm_s: float
    link_bytes: np.ndarray | None


@dataclass(frozen=True)
class LayerCostStore:
    """A folder of priced buckets: ``<folder>/<layer key>/<tokens>.npz``."""

    folder: Path

    def _file(self, key: str, tokens: int) -> Path:
        return self.folder / key / f"{tokens}.npz"

    def get(self, key: str, tokens: int) -> StoredBucket | None:
        """The stored bucket, or None when absent or unreadable (then it is priced)."""
        try:
            with np.load(self._file(key, tokens)) as z:
                links = z["link_bytes"] if bool(z["has_links"]) else None
                return StoredBucket(
                    float(z["time_s"]), float(z["dropped_fraction"]), float(z["comm_s"]), links
                )
        except (OSError, KeyError, ValueError):
            return None

    def put(self, key: str, tokens: int, bucket: StoredBucket) -> None:
        """Write a bucket atomically (a failure to write is not an error: the run goes on
        without storing it)."""
        target = self._file(key, tokens)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(
                        f,
                        time_s=bucket.time_s,
                        dropped_fraction=bucket.dropped_fraction,
                        comm_s=bucket.comm_s,
                        has_links=bucket.link_bytes is not None,
                        link_bytes=(
                            bucket.link_bytes if bucket.link_bytes is not None else np.zeros(0)
                        ),
                    )
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return


_CONFIGURED: list[LayerCostStore | None] = []


def use_store(folder: str | Path | None) -> None:
    """Use a store in ``folder`` for the layer costs this process builds from now on
    (None: none, whatever the environment says)."""
    _CONFIGURED[:] = [LayerCostStore(Path(folder)) if folder is not None else None]


@contextmanager
def store_in(folder: str | Path | None) -> Iterator[None]:
    """:func:`use_store` for the duration of a ``with`` block (then as it was)."""
    saved = list(_CONFIGURED)
    if folder is not None:
        use_store(folder)
    try:
        yield
    finally:
        _CONFIGURED[:] = saved


def default_store() -> LayerCostStore | None:
    """The store set by :func:`use_store`, else the one ``MOESIM_COST_CACHE`` names."""
    if _CONFIGURED:
        return _CONFIGURED[0]
    folder = os.environ.get(ENV_VAR)
    return LayerCostStore(Path(folder)) if folder else None
