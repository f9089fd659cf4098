"""Timing and device helpers of the PyTorch measurement harness (moesim.calibrate.torch_bench):
CUDA-event clocks with warm-up and medians, output sink, deadlines, seeded tensors.

Imports only the standard library, numpy and torch (runs on bare GPU machines).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from moesim.calibrate.torch_moe_consts import (
    _T0,
)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Sink:
    """Appends records to a JSONL file line by line (flushed) and keeps them for the summary."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.records: list[dict[str, Any]] = []

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        rec = _clean({"kind": kind, **fields})
        self.records.append(rec)
        if self.stream is not None:
            self.stream.write(json.dumps(rec) + "\n")
            self.stream.flush()
        return rec


class Deadline:
    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exceeded(self) -> bool:
        return self.budget_s > 0 and self.elapsed() > self.budget_s


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 3
    min_reps: int = 15
    max_reps: int = 200
    target_s: float = 0.1  # aim for this much timed work per measurement
    max_s: float = 1.0  # and never much more than this (fewer reps, at least 3)


class Clock:
    """Median per-repetition time of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, policy: TimingPolicy) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.policy = policy

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _once(self, fn: Callable[[int], Any], i: int) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t) * 1e3

    def time_graph(self, fn: Callable[[], Any]) -> float | None:
        """Median ms of CUDA-graph replays of ``fn`` (None off CUDA or when capture fails)."""
        if not self.cuda:
            return None
        graph = None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return self.time(fixed(graph.replay))[0]
        except RuntimeError as exc:
            log(f"CUDA graph capture failed: {str(exc)[:200]}")
            return None
        finally:
            del graph
            self.sync()

    def time(self, fn: Callable[[int], Any]) -> tuple[float, int]:
        """(median ms, repetitions). ``fn(i)`` gets the repetition index (to rotate inputs)."""
        p = self.policy
        for i in range(p.warmup):
            fn(i)
        self.sync()
        probe = max(self._once(fn, p.warmup), 1e-4)
        reps = int(min(p.max_reps, max(p.min_reps, p.target_s * 1e3 / probe)))
        if probe * reps > p.max_s * 1e3:
            reps = max(3, int(p.max_s * 1e3 / probe))
        base = p.warmup + 1
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                starts[i].record()
                fn(base + i)
                ends[i].record()
            ends[-1].synchronize()
            times = [float(s.elapsed_time(e)) for s, e in zip(starts, ends)]
        else:
            times = []
            for i in range(reps):
                t = time.perf_counter()
                fn(base + i)
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), reps


# --------------------------------------------------------------------------- helpers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def fixed(fn: Callable[..., Any], *args: Any) -> Callable[[int], Any]:
    """A callable for ``Clock.time`` that ignores the repetition index."""

    def call(_i: int) -> Any:
        return fn(*args)

    return call


def _randn(shape: Sequence[int], dev: torch.device, dtype: torch.dtype, gen: Any, std: float = 1.0):
    """Normal(0, std) tensor drawn in place (no float32 temporary for big bf16 weights)."""
    return torch.empty(tuple(shape), device=dev, dtype=dtype).normal_(0.0, std, generator=gen)


def _gen(dev: torch.device, seed: int) -> Any:
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    return g


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    den = float(torch.linalg.vector_norm(b64))
    num = float(torch.linalg.vector_norm(a64 - b64))
    return num / den if den > 0 else num


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("swiglu", "silu"):
        return F.silu
    if name in ("geglu", "gelu"):
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


def device_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def l2_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20))
    return 32 << 20
