"""Stand-alone PyTorch measurement harness for calibrating moesim on real GPUs.

Run on a GPU machine (needs only the standard library, numpy, torch and, for the model
catalog, PyYAML)::

    python3 -m moesim.calibrate.torch_bench --out h100.jsonl [--quick] \
        [--only gemm,grouped,memory,launch,layers] [--models mixtral-8x7b,...] [--budget-s 420]

It appends one JSON object per line to ``--out`` (flushed after every line, so a killed run
keeps what it measured); every object has a ``kind``. Times are medians in milliseconds of
per-repetition CUDA-event timings, taken after warm-up (see ``Clock``):

* ``env``: torch, cuda, name, sms, mem (bytes), l2 (bytes), smi (``nvidia-smi`` line or null),
  grouped_mm (whether ``torch._grouped_mm`` works for bf16 here), grouped_mm_align (row
  alignment of group offsets it needed: 1, 16, or null), device, dtype, date, argv.
* ``gemm``: ``X[M,K] @ W[K,N]`` (W row-major), M, K, N, dtype, ms, tflops (2MKN / time).
  Inputs are rotated over several copies when one set would sit in L2.
* ``grouped_gemm``: impl (``grouped_mm`` | ``loop``), groups, K, N, tokens, distribution
  (``uniform`` | ``zipf1`` | ``single``), counts (rows per group), dtype, ms. Weights are
  stored ``[G, N, K]`` (``nn.Linear`` layout) and passed transposed, as torchtitan does.
* ``d2d``: bytes, ms, gbps_rw (bytes read + written per second / 1e9).
* ``launch``: us_per_kernel (back-to-back ``x.add_(1)`` on a 1-element tensor), kernels.
* ``moe_layer``: a real MoE layer forward (router GEMM, softmax, top-k, permute, experts,
  combine, shared experts), fields model, impl, tokens, routing, seed, experts, top_k,
  d_model, expert_d_ff, activation, shared_experts, shared_expert_d_ff, dtype, counts (slots
  routed to each expert), ms, ms_parts {router, permute, experts, combine, shared} (each stage
  timed alone, medians; shared is null without shared experts), ms_graph (grouped_mm only: the
  same forward captured in a CUDA graph and replayed, i.e. GPU time without Python launch
  overhead; null for loop, on CPU, or if capture failed), reps. Eager ``ms`` at small T is
  launch-bound (~6-8 us of host time per kernel, ~25 kernels) and jitters with the host.
* ``check``: one per model: grouped_mm and loop outputs against a dense float32 reference
  (every expert on every token, masked and weighted by the routing): rel_err_grouped_mm,
  rel_err_loop, rel_err_grouped_vs_loop (||a - b|| / ||b||), tol, ok.
* ``skipped`` (model, reason), ``error`` (section, config, error), ``stopped`` (section,
  reason, elapsed_s): what was not measured and why.

Routing skew is controlled by Gumbel-top-k sampling: logits = (x @ Wg) * 1e-4 + log p +
Gumbel noise, the noise drawn per token from a seeded CPU ``torch.Generator``, so the top-k
experts of a token are a sample without replacement from the popularity p (uniform, or
zipf(s=1) over expert index: expert 0 is the most popular). The router GEMM stays in the timed
path. The router is a softmax router for every model (DeepSeek-V3's sigmoid/group-limited
routing and Qwen's shared-expert gate are not modelled: both are negligible elementwise work).

torch._grouped_mm, as relied on here (torch 2.8 .. 2.13 source, GroupedMMUtils.h and
GroupedBlas.cpp): ``torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None)``;
for MoE, mat_a is 2-D ``[rows, K]`` (row-major, K * 2 bytes a multiple of 16), mat_b 3-D
``[G, K, N]`` (either row- or column-major in its last two dims, leading stride a multiple of
16 bytes), offs 1-D int32 of length G holding the cumulative END row of each group (so the last
equals ``rows``; empty groups repeat the previous value); bias unsupported; out dtype = in
dtype. On sm90/sm100 with bf16 it runs a CUTLASS grouped kernel with no host sync; otherwise
(fp32/fp16, other GPUs, CPU) it falls back to a loop of ``mm`` that reads offs on the host. The
forward 2-D x 3-D case is not known to need group sizes aligned to 16 rows (that alignment is
for the 2-D x 2-D weight-gradient case), but ``probe_grouped_mm`` checks unaligned offsets on
the device first; if they fail and 16-row alignment works, the layer pads every expert's rows
to a multiple of 16 (device-side index arithmetic, no sync) and grouped_mm_align says 16.

Run time: a full (non-quick) run took 136 s of wall time on one H100 80GB HBM3 (torch
2.11.0+cu130, 2026-11-22): launch/memory ~1 s, gemm ~13 s (525 shapes), grouped ~5 s (108
configurations), layers ~115 s (8 models fit, 3 skipped; 2 routings x (8 + 7) token counts, each
timed whole, per stage and as a CUDA graph); --quick took 21 s. The default ``--budget-s 420``
stops any section gracefully (a ``stopped`` record) past 7 min of wall time.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

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


def popularity(experts: int, routing: str) -> np.ndarray:
    """Expert popularity p (sums to 1): uniform, or zipf(s=1) over the expert index."""
    if routing == "uniform":
        p = np.ones(experts)
    elif routing in ("zipf1", "zipf"):
        p = 1.0 / np.arange(1, experts + 1, dtype=np.float64)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    return p / p.sum()


def group_counts(groups: int, tokens: int, distribution: str, seed: int) -> list[int]:
    """Rows per group: multinomial(tokens, popularity) or all rows in group 0 ('single')."""
    if distribution == "single":
        return [tokens] + [0] * (groups - 1)
    rng = np.random.default_rng(seed)
    return [int(c) for c in rng.multinomial(tokens, popularity(groups, distribution))]


# --------------------------------------------------------------------------- grouped_mm


def grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a[rows,K]`` times per-group ``b_t[G,K,N]``; offs = int32 cumulative end rows."""
    return torch._grouped_mm(a, b_t, offs=offs)


def _probe_case(dev: torch.device, dtype: torch.dtype, counts: list[int]) -> bool:
    g = _gen(dev, 1234)
    k, n = 64, 48
    x = _randn((sum(counts), k), dev, dtype, g)
    w = _randn((len(counts), n, k), dev, dtype, g)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=dev)
    out = grouped_mm(x, w.transpose(-2, -1), offs)
    ref = torch.empty_like(out, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        ref[start : start + c] = x[start : start + c].float() @ w[e].float().t()
        start += c
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return bool(torch.isfinite(out).all()) and _rel_err(out.float(), ref) < 2e-2


def probe_grouped_mm(dev: torch.device, dtype: torch.dtype) -> tuple[bool, int | None, str]:
    """(works, row alignment of group offsets it needs, note) for torch._grouped_mm."""
    if not hasattr(torch, "_grouped_mm"):
        return False, None, "torch has no _grouped_mm"
    try:
        if _probe_case(dev, dtype, [3, 0, 17, 5, 1]):
            return True, 1, "unaligned offsets ok"
        note = "unaligned offsets gave wrong results"
    except RuntimeError as exc:
        note = f"unaligned offsets failed: {str(exc)[:200]}"
    try:
        if _probe_case(dev, dtype, [16, 0, 32, 16, 48]):
            return True, 16, note
    except RuntimeError as exc:
        return False, None, f"{note}; aligned failed: {str(exc)[:200]}"
    return False, None, f"{note}; aligned gave wrong results"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LayerSpec:
    name: str
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    activation: str
    shared_experts: int = 0
    shared_d_ff: int = 0

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def n_mats(self) -> int:
        return 3 if self.gated else 2

    def expert_weight_bytes(self, elem: int = 2) -> int:
        return self.experts * self.n_mats * self.d_model * self.d_ff * elem

    def weight_bytes(self, elem: int = 2) -> int:
        shared = self.shared_experts * self.shared_d_ff * self.n_mats * self.d_model
        return self.expert_weight_bytes(elem) + (shared + self.d_model * self.experts) * elem

    def tiny(self) -> LayerSpec:
        """Same structure at toy size, for CPU tests."""
        experts = min(self.experts, 16)
        ratio = max(1, round(self.shared_d_ff / self.d_ff)) if self.shared_experts else 0
        return replace(
            self,
            d_model=64,
            d_ff=32,
            experts=experts,
            top_k=min(self.top_k, experts),
            shared_d_ff=32 * ratio,
        )


def load_models(path: str | Path | None = None) -> dict[str, LayerSpec]:
    """MoE-layer shapes of every preset of moesim's model catalog (models.yaml)."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "torch_bench reads the model catalog with PyYAML, which is not installed here: "
            "`pip install pyyaml`, or run only --only gemm,grouped,memory,launch"
        ) from exc
    with open(path or CATALOG) as fh:
        raw = yaml.safe_load(fh)
    specs = {}
    for name, m in raw.items():
        shared = int(m.get("shared_experts") or 0)
        specs[name] = LayerSpec(
            name=name,
            d_model=int(m["d_model"]),
            d_ff=int(m["expert_d_ff"]),
            experts=int(m["experts"]),
            top_k=int(m["top_k"]),
            activation=str(m.get("activation", "swiglu")),
            shared_experts=shared,
            shared_d_ff=int(m.get("shared_expert_d_ff") or m["expert_d_ff"]) if shared else 0,
        )
    return specs


def gemm_shapes(specs: Sequence[LayerSpec]) -> list[tuple[int, int]]:
    """Deduplicated (K, N) pairs: up, down, fused gated up, router."""
    pairs: list[tuple[int, int]] = []
    for s in specs:
        cand = [(s.d_model, s.d_ff), (s.d_ff, s.d_model)]
        if s.gated:
            cand.append((s.d_model, 2 * s.d_ff))
        cand.append((s.d_model, s.experts))
        for p in cand:
            if p not in pairs:
                pairs.append(p)
    return pairs


# --------------------------------------------------------------------------- MoE layer


@dataclass
class Perm:
    xs: torch.Tensor  # token rows in expert order (padded per expert when dest is set)
    order: torch.Tensor  # sorted slot -> flat slot (token * k + j)
    token_idx: torch.Tensor  # sorted slot -> token
    offs: torch.Tensor  # int32 cumulative end rows per expert (of xs)
    ends: torch.Tensor  # int32 cumulative end rows per expert, unpadded
    dest: torch.Tensor | None = None  # sorted slot -> row of the padded xs


class MoELayer:
    """One MoE layer with random weights, forward only.

    Weights use the ``nn.Linear`` layout ``[out, in]``: w_up ``[E, 2*d_ff or d_ff, d_model]``
    (gate then up for gated activations), w_down ``[E, d_model, d_ff]``.
    """

    def __init__(
        self,
        spec: LayerSpec,
        dev: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        align: int = 1,
    ) -> None:
        self.spec, self.dev, self.dtype, self.align = spec, dev, dtype, align
        g = _gen(dev, seed)
        d, f, e = spec.d_model, spec.d_ff, spec.experts
        n_up = 2 * f if spec.gated else f
        self.w_router = _randn((d, e), dev, dtype, g, WEIGHT_STD)
        self.w_up = _randn((e, n_up, d), dev, dtype, g, WEIGHT_STD)
        self.w_down = _randn((e, d, f), dev, dtype, g, WEIGHT_STD)
        self.act = _act(spec.activation)
        self.expert_ids = torch.arange(e, device=dev)
        fs = spec.shared_experts * spec.shared_d_ff
        self.ws_up = self.ws_down = None
        if fs:
            self.ws_up = _randn((2 * fs if spec.gated else fs, d), dev, dtype, g, WEIGHT_STD)
            self.ws_down = _randn((d, fs), dev, dtype, g, WEIGHT_STD)

    # -- routing input ---------------------------------------------------------------
    def routing_bias(self, tokens: int, routing: str, seed: int) -> torch.Tensor:
        """float32 [T, E]: log p + Gumbel noise from a seeded CPU generator."""
        g = torch.Generator()
        g.manual_seed(seed)
        u = torch.rand((tokens, self.spec.experts), generator=g, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-12)))
        logp = torch.from_numpy(np.log(popularity(self.spec.experts, routing)))
        return (gumbel + logp).float().to(self.dev)

    def inputs(self, tokens: int, seed: int) -> torch.Tensor:
        return _randn((tokens, self.spec.d_model), self.dev, self.dtype, _gen(self.dev, seed + 1))

    # -- stages -------------------------------------------------------------------------
    def _ffn(self, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        h = x @ w_up.t()
        a = self._activate(h)
        return a @ w_down.t()

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.spec.gated:
            f = h.shape[-1] // 2
            return self.act(h[:, :f]) * h[:, f:]
        return self.act(h)

    def router(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (x @ self.w_router).float() * ROUTER_SCALE + bias
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), ids

    def permute(self, x: torch.Tensor, ids: torch.Tensor, pad: bool = False) -> Perm:
        k = self.spec.top_k
        sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
        token_idx = order // k
        xs = x.index_select(0, token_idx)
        ends = torch.searchsorted(sorted_ids, self.expert_ids, right=True, out_int32=True)
        if not (pad and self.align > 1):
            return Perm(xs, order, token_idx, ends, ends)
        a = self.align
        ends64 = ends.long()
        counts = torch.diff(ends64, prepend=ends64.new_zeros(1))
        padded = (counts + a - 1) // a * a
        pends = torch.cumsum(padded, 0)
        n = xs.shape[0]
        slot = torch.arange(n, device=x.device)
        dest = (pends - padded)[sorted_ids] + slot - (ends64 - counts)[sorted_ids]
        buf = x.new_zeros((n + self.spec.experts * (a - 1), x.shape[1]))
        buf.index_copy_(0, dest, xs)
        return Perm(buf, order, token_idx, pends.to(torch.int32), ends, dest)

    def experts_grouped(self, perm: Perm) -> torch.Tensor:
        h = grouped_mm(perm.xs, self.w_up.transpose(-2, -1), perm.offs)
        out = grouped_mm(self._activate(h), self.w_down.transpose(-2, -1), perm.offs)
        return out if perm.dest is None else out.index_select(0, perm.dest)

    def experts_loop(self, perm: Perm) -> torch.Tensor:
        """Per-expert loop over contiguous row blocks; reads the counts on the host (HF style)."""
        ends = perm.ends.tolist()
        out = perm.xs.new_empty((perm.xs.shape[0], self.spec.d_model))
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                a = self._activate(perm.xs[start:end] @ self.w_up[e].t())
                torch.mm(a, self.w_down[e].t(), out=out[start:end])
            start = end
        return out

    def combine(self, ys: torch.Tensor, w: torch.Tensor, perm: Perm, tokens: int) -> torch.Tensor:
        ws = w.reshape(-1).index_select(0, perm.order).unsqueeze(-1)
        y = torch.zeros((tokens, self.spec.d_model), device=ys.device, dtype=ys.dtype)
        return y.index_add_(0, perm.token_idx, ys * ws)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.ws_up is None:
            return None
        return self._ffn(x, self.ws_up, self.ws_down)

    def experts(self, perm: Perm, impl: str) -> torch.Tensor:
        return self.experts_grouped(perm) if impl == "grouped_mm" else self.experts_loop(perm)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, impl: str) -> torch.Tensor:
        w, ids = self.router(x, bias)
        perm = self.permute(x, ids, pad=impl == "grouped_mm")
        y = self.combine(self.experts(perm, impl), w, perm, x.shape[0])
        s = self.shared(x)
        return y if s is None else y + s

    def reference(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Dense float32: every expert on every token, masked and weighted by the routing."""
        xf = x.float()
        gate = torch.zeros((x.shape[0], self.spec.experts), device=x.device)
        gate.scatter_add_(1, ids, w.float())
        y = torch.zeros((x.shape[0], self.spec.d_model), device=x.device)
        for e in range(self.spec.experts):
            ye = self._ffn(xf, self.w_up[e].float(), self.w_down[e].float())
            y += gate[:, e : e + 1] * ye
        if self.ws_up is not None and self.ws_down is not None:
            y += self._ffn(xf, self.ws_up.float(), self.ws_down.float())
        return y


def check_layer(
    layer: MoELayer, impls: Sequence[str], tokens: int = CHECK_TOKENS, seed: int = 0
) -> dict[str, Any]:
    """Relative errors of the layer implementations against the dense float32 reference."""
    routing = "zipf1"  # skewed: leaves some experts empty, which the kernels must handle
    x = layer.inputs(tokens, seed + 7)
    bias = layer.routing_bias(tokens, routing, seed + 7)
    w, ids = layer.router(x, bias)
    ref = layer.reference(x, w, ids)
    outs: dict[str, torch.Tensor] = {}
    for impl in impls:
        perm = layer.permute(x, ids, pad=impl == "grouped_mm")
        y = layer.combine(layer.experts(perm, impl), w, perm, tokens)
        s = layer.shared(x)
        outs[impl] = (y if s is None else y + s).float()
    errs: dict[str, float | None] = {
        f"rel_err_{impl}": _rel_err(outs[impl], ref) if impl in outs else None
        for impl in ("grouped_mm", "loop")
    }
    errs["rel_err_grouped_vs_loop"] = (
        _rel_err(outs["grouped_mm"], outs["loop"]) if len(outs) == 2 else None
    )
    finite = all(bool(torch.isfinite(o).all()) for o in outs.values())
    measured = [v for v in errs.values() if v is not None]
    ok = finite and all(v < CHECK_TOL for v in measured)
    return {
        "model": layer.spec.name,
        "tokens": tokens,
        "routing": routing,
        "seed": seed + 7,
        "dtype": DTYPE_NAMES.get(layer.dtype, str(layer.dtype)),
        "impls": list(outs),
        **errs,
        "tol": CHECK_TOL,
        "ok": ok,
    }


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Plan:
    gemm_m: tuple[int, ...]
    grouped_shapes: tuple[tuple[str, int, int, int], ...]  # (label, groups, K, N)
    grouped_tokens: tuple[int, ...]
    layer_tokens: tuple[int, ...]
    d2d_bytes: tuple[int, ...]
    launch_kernels: int
    loop_max_tokens: int = 4096


FULL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
GROUPED_SHAPES = (
    ("mixtral-8x7b up", 8, 4096, 14336),
    ("deepseek-v3 up", 256, 7168, 2048),
    ("olmoe up", 64, 2048, 1024),
)


def make_plan(quick: bool, tiny: bool) -> Plan:
    if tiny:
        return Plan(
            gemm_m=(1, 16),
            grouped_shapes=(("tiny8", 8, 64, 32), ("tiny16", 16, 32, 64)),
            grouped_tokens=(1, 8, 64),
            layer_tokens=(1, 8, 32),
            d2d_bytes=(1 << 20, 4 << 20),
            launch_kernels=100,
        )
    return Plan(
        gemm_m=(1, 16, 256, 4096) if quick else FULL_M,
        grouped_shapes=GROUPED_SHAPES,
        grouped_tokens=(1, 64, 4096) if quick else (1, 8, 64, 512, 4096, 16384),
        layer_tokens=(1, 64, 1024) if quick else (1, 4, 16, 64, 256, 1024, 4096, 16384),
        d2d_bytes=tuple((64 << 20) << i for i in range(2 if quick else 6)),
        launch_kernels=1000,
    )


@dataclass
class Ctx:
    dev: torch.device
    dtype: torch.dtype
    clock: Clock
    sink: Sink
    deadline: Deadline
    plan: Plan
    grouped_ok: bool
    align: int
    seed: int = 0
    parts: bool = True
    graphs: bool = True

    def stop(self, section: str) -> bool:
        if self.deadline.exceeded():
            self.sink.write(
                "stopped",
                section=section,
                reason="budget",
                elapsed_s=round(self.deadline.elapsed(), 1),
                budget_s=self.deadline.budget_s,
            )
            log(f"budget of {self.deadline.budget_s} s exceeded: stopping at {section}")
            return True
        return False

    def error(self, section: str, config: dict[str, Any], exc: BaseException) -> None:
        log(f"ERROR in {section} {config}: {exc}")
        self.sink.write("error", section=section, config=config, error=str(exc)[:800])
        _free(self.dev)


def env_record(dev: torch.device, dtype: torch.dtype, argv: Sequence[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": dev.type,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "mem": device_memory(dev),
        "l2": l2_bytes(dev),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "argv": list(argv),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rec["name"], rec["sms"] = props.name, int(props.multi_processor_count)
    else:
        rec["name"], rec["sms"] = "cpu", os.cpu_count()
    rec["smi"] = None
    try:
        q = "name,clocks.sm,clocks.mem,power.limit,memory.total"
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if res.returncode == 0 and res.stdout.strip():
            rec["smi"] = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    ok, align, note = probe_grouped_mm(dev, torch.bfloat16)
    rec["grouped_mm"], rec["grouped_mm_align"], rec["grouped_mm_note"] = ok, align, note
    if dtype != torch.bfloat16:
        ok2, align2, note2 = probe_grouped_mm(dev, dtype)
        rec["grouped_mm_run_dtype"], rec["grouped_mm_run_align"] = ok2, align2
        rec["grouped_mm_run_note"] = note2
    return rec


def run_launch(ctx: Ctx) -> None:
    n = ctx.plan.launch_kernels
    x = torch.ones(1, device=ctx.dev, dtype=torch.float32)

    def many(_: int) -> None:
        for _k in range(n):
            x.add_(1)

    ms, reps = ctx.clock.time(many)
    us = ms * 1e3 / n
    ctx.sink.write("launch", us_per_kernel=us, kernels=n, reps=reps)
    log(f"launch: {us:.2f} us/kernel")


def run_memory(ctx: Ctx) -> None:
    for nbytes in ctx.plan.d2d_bytes:
        if ctx.stop("memory"):
            return
        try:
            src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=ctx.dev)
            dst = torch.empty_like(src)
            ms, reps = ctx.clock.time(fixed(dst.copy_, src))
            gbps = 2 * nbytes / (ms * 1e-3) / 1e9
            ctx.sink.write("d2d", bytes=nbytes, ms=ms, gbps_rw=gbps, reps=reps)
            log(f"d2d {nbytes >> 20} MiB: {ms:.3f} ms, {gbps:.0f} GB/s (r+w)")
            del src, dst
        except RuntimeError as exc:
            ctx.error("memory", {"bytes": nbytes}, exc)
    _free(ctx.dev)


def run_gemm(ctx: Ctx, specs: Sequence[LayerSpec]) -> None:
    elem = torch.finfo(ctx.dtype).bits // 8
    l2 = l2_bytes(ctx.dev)
    g = _gen(ctx.dev, ctx.seed + 11)
    for k, n in gemm_shapes(specs):
        if ctx.stop("gemm"):
            return
        for m in ctx.plan.gemm_m:
            nbytes = (m * k + k * n + m * n) * elem
            if nbytes > GEMM_MAX_BYTES:
                continue
            try:
                sets = min(64, max(1, math.ceil(3 * l2 / nbytes)))
                xs = [_randn((m, k), ctx.dev, ctx.dtype, g) for _ in range(sets)]
                ws = [_randn((k, n), ctx.dev, ctx.dtype, g) for _ in range(sets)]
                ms, reps = ctx.clock.time(functools.partial(_rotated_mm, xs, ws))
                tflops = 2.0 * m * k * n / (ms * 1e-3) / 1e12
                ctx.sink.write(
                    "gemm",
                    M=m,
                    K=k,
                    N=n,
                    dtype=DTYPE_NAMES[ctx.dtype],
                    ms=ms,
                    tflops=tflops,
                    reps=reps,
                    input_sets=sets,
                )
                del xs, ws
            except RuntimeError as exc:
                ctx.error("gemm", {"M": m, "K": k, "N": n}, exc)
        log(f"gemm K={k} N={n}: done ({len(ctx.plan.gemm_m)} M values)")
    _free(ctx.dev)


def run_grouped(ctx: Ctx) -> None:
    impls = (["grouped_mm"] if ctx.grouped_ok else []) + ["loop"]
    g = _gen(ctx.dev, ctx.seed + 13)
    for label, groups, k, n in ctx.plan.grouped_shapes:
        if ctx.stop("grouped"):
            return
        try:
            w = _randn((groups, n, k), ctx.dev, ctx.dtype, g, WEIGHT_STD)
        except RuntimeError as exc:
            ctx.error("grouped", {"shape": label}, exc)
            continue
        w_t = w.transpose(-2, -1)
        for tokens in ctx.plan.grouped_tokens:
            for dist in ("uniform", "zipf1", "single"):
                counts = group_counts(groups, tokens, dist, ctx.seed + tokens)
                cfg = {"shape": label, "tokens": tokens, "distribution": dist}
                try:
                    x = _randn((tokens, k), ctx.dev, ctx.dtype, g)
                    for impl in impls:
                        if impl == "grouped_mm":
                            xa, ca = _pad_rows(x, counts, ctx.align)
                            offs = torch.tensor(np.cumsum(ca), dtype=torch.int32, device=ctx.dev)
                            ms, reps = ctx.clock.time(fixed(grouped_mm, xa, w_t, offs))
                        else:
                            ms, reps = ctx.clock.time(fixed(_loop_mm, x, w, counts))
                        ctx.sink.write(
                            "grouped_gemm",
                            impl=impl,
                            groups=groups,
                            K=k,
                            N=n,
                            tokens=tokens,
                            distribution=dist,
                            counts=counts,
                            dtype=DTYPE_NAMES[ctx.dtype],
                            ms=ms,
                            reps=reps,
                        )
                except RuntimeError as exc:
                    ctx.error("grouped", cfg, exc)
        log(f"grouped {label}: done")
        del w, w_t
        _free(ctx.dev)


def _rotated_mm(xs: list[torch.Tensor], ws: list[torch.Tensor], i: int) -> torch.Tensor:
    return xs[i % len(xs)] @ ws[i % len(ws)]


def _pad_rows(x: torch.Tensor, counts: list[int], align: int) -> tuple[torch.Tensor, list[int]]:
    """Rows of each group padded to a multiple of align (identity when align is 1)."""
    if align <= 1:
        return x, counts
    padded = [(c + align - 1) // align * align for c in counts]
    out = x.new_zeros((sum(padded), x.shape[1]))
    src = dst = 0
    for c, p in zip(counts, padded):
        out[dst : dst + c] = x[src : src + c]
        src, dst = src + c, dst + p
    return out, padded


def _loop_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = x.new_empty((x.shape[0], w.shape[1]))
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x[start : start + c], w[e].t(), out=out[start : start + c])
        start += c
    return out


def fits(spec: LayerSpec, dev: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    elem = torch.finfo(dtype).bits // 8
    need, mem = spec.weight_bytes(elem), device_memory(dev)
    if need > MEM_FRACTION * mem:
        return False, (
            f"weights {need / 2**30:.1f} GiB > {MEM_FRACTION:.0%} of device memory "
            f"{mem / 2**30:.1f} GiB"
        )
    return True, ""


def layer_fields(spec: LayerSpec) -> dict[str, Any]:
    return {
        "experts": spec.experts,
        "top_k": spec.top_k,
        "d_model": spec.d_model,
        "expert_d_ff": spec.d_ff,
        "activation": spec.activation,
        "shared_experts": spec.shared_experts,
        "shared_expert_d_ff": spec.shared_d_ff if spec.shared_experts else None,
    }


def measure_layer(
    ctx: Ctx, layer: MoELayer, tokens: int, routing: str, impl: str, seed: int
) -> dict[str, Any]:
    x = layer.inputs(tokens, seed)
    bias = layer.routing_bias(tokens, routing, seed)
    w, ids = layer.router(x, bias)
    counts = torch.bincount(ids.reshape(-1), minlength=layer.spec.experts).tolist()
    ms, reps = ctx.clock.time(lambda _i: layer.forward(x, bias, impl))
    ms_graph = None
    if ctx.graphs and impl == "grouped_mm":
        ms_graph = ctx.clock.time_graph(lambda: layer.forward(x, bias, impl))
    parts: dict[str, float | None] | None = None
    if ctx.parts:
        perm = layer.permute(x, ids, pad=impl == "grouped_mm")
        ys = layer.experts(perm, impl)
        parts = {
            "router": ctx.clock.time(lambda _i: layer.router(x, bias))[0],
            "permute": ctx.clock.time(lambda _i: layer.permute(x, ids, impl == "grouped_mm"))[0],
            "experts": ctx.clock.time(lambda _i: layer.experts(perm, impl))[0],
            "combine": ctx.clock.time(lambda _i: layer.combine(ys, w, perm, tokens))[0],
            "shared": ctx.clock.time(lambda _i: layer.shared(x))[0]
            if layer.ws_up is not None
            else None,
        }
    return ctx.sink.write(
        "moe_layer",
        model=layer.spec.name,
        impl=impl,
        tokens=tokens,
        routing=routing,
        seed=seed,
        **layer_fields(layer.spec),
        dtype=DTYPE_NAMES[ctx.dtype],
        counts=counts,
        ms=ms,
        ms_parts=parts,
        ms_graph=ms_graph,
        reps=reps,
    )


def run_layers(ctx: Ctx, specs: Sequence[LayerSpec]) -> None:
    impls = (["grouped_mm"] if ctx.grouped_ok else []) + ["loop"]
    for spec in specs:
        if ctx.stop("layers"):
            return
        ok, reason = fits(spec, ctx.dev, ctx.dtype)
        if not ok:
            ctx.sink.write("skipped", model=spec.name, reason=reason)
            log(f"layers {spec.name}: skipped ({reason})")
            continue
        layer = None
        try:
            layer = MoELayer(spec, ctx.dev, ctx.dtype, seed=ctx.seed, align=ctx.align)
            chk = check_layer(layer, impls, seed=ctx.seed)
            ctx.sink.write("check", **chk)
            log(f"layers {spec.name}: check {'ok' if chk['ok'] else 'FAILED'} {chk}")
        except RuntimeError as exc:
            ctx.error("layers", {"model": spec.name, "stage": "build/check"}, exc)
            del layer
            _free(ctx.dev)
            continue
        for tokens in ctx.plan.layer_tokens:
            if ctx.stop("layers"):
                break
            for routing in ("uniform", "zipf1"):
                for impl in impls:
                    if impl == "loop" and tokens > ctx.plan.loop_max_tokens:
                        continue
                    try:
                        rec = measure_layer(ctx, layer, tokens, routing, impl, ctx.seed)
                        log(f"  {spec.name} T={tokens} {routing} {impl}: {rec['ms']:.3f} ms")
                    except RuntimeError as exc:
                        cfg = {"model": spec.name, "tokens": tokens, "routing": routing}
                        ctx.error("layers", {**cfg, "impl": impl}, exc)
            _free(ctx.dev)
        del layer
        _free(ctx.dev)


# --------------------------------------------------------------------------- summary


def summary(records: Sequence[dict[str, Any]], out: TextIO) -> None:
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print("records: " + ", ".join(f"{k}={v}" for k, v in kinds.items()), file=out)
    for r in records:
        if r["kind"] == "env":
            print(
                f"device: {r.get('name')} ({r.get('sms')} SMs), torch {r.get('torch')}, "
                f"grouped_mm={r.get('grouped_mm')} align={r.get('grouped_mm_align')}",
                file=out,
            )
        elif r["kind"] == "launch":
            print(f"launch: {r['us_per_kernel']:.2f} us/kernel", file=out)
        elif r["kind"] in ("skipped", "stopped", "error"):
            print(f"{r['kind']}: {json.dumps(r)[:200]}", file=out)
    d2d = [r for r in records if r["kind"] == "d2d"]
    if d2d:
        print(f"d2d: max {max(r['gbps_rw'] for r in d2d):.0f} GB/s (r+w)", file=out)
    gemm = [r for r in records if r["kind"] == "gemm"]
    if gemm:
        best = max(gemm, key=lambda r: r["tflops"])
        print(
            f"gemm: {len(gemm)} shapes, best {best['tflops']:.0f} TFLOP/s at "
            f"{best['M']}x{best['K']}x{best['N']}",
            file=out,
        )
    for r in records:
        if r["kind"] == "check":
            print(
                f"check {r['model']:<20} ok={r['ok']} grouped={r['rel_err_grouped_mm']} "
                f"loop={r['rel_err_loop']}",
                file=out,
            )
    layers = [r for r in records if r["kind"] == "moe_layer"]
    if layers:
        toks = sorted({r["tokens"] for r in layers})
        print("moe_layer ms (uniform routing), model/impl x tokens:", file=out)
        print(f"{'':<30}" + "".join(f"{t:>10}" for t in toks), file=out)
        rows: dict[tuple[str, str], dict[int, float]] = {}
        for r in layers:
            if r["routing"] == "uniform":
                rows.setdefault((r["model"], r["impl"]), {})[r["tokens"]] = r["ms"]
        for (model, impl), by_t in rows.items():
            cells = "".join(f"{by_t[t]:>10.3f}" if t in by_t else f"{'-':>10}" for t in toks)
            print(f"{(model + ' ' + impl)[:30]:<30}{cells}", file=out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python3 -m moesim.calibrate.torch_bench",
        description="Measure GEMMs, grouped GEMMs, memory copies, launches and whole MoE "
        "layers with PyTorch; append JSONL records to --out.",
    )
    ap.add_argument("--out", required=True, help="JSONL file to append to")
    ap.add_argument("--quick", action="store_true", help="small grids (a few minutes less)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections: " + ",".join(SECTIONS))
    ap.add_argument("--models", default="", help="comma-separated presets (default: all)")
    ap.add_argument("--catalog", default=None, help="models.yaml (default: moesim's catalog)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument("--tiny", action="store_true", help="toy shapes and few repeats (tests)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop sections past this wall time (0: no limit)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-parts", action="store_true", help="skip per-stage layer timings")
    ap.add_argument(
        "--no-graphs", action="store_true", help="skip CUDA-graph replays of grouped_mm layers"
    )
    ap.add_argument("--no-loop", action="store_true", help="skip the loop layer impl")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {SECTIONS}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    plan = make_plan(args.quick, args.tiny)
    if args.no_loop:
        plan = replace(plan, loop_max_tokens=0)
    policy = (
        TimingPolicy(warmup=1, min_reps=3, max_reps=5, target_s=0.0)
        if args.tiny
        else (TimingPolicy())
    )
    specs: list[LayerSpec] = []
    if "gemm" in only or "layers" in only:
        catalog = load_models(args.catalog)
        names = [m.strip() for m in args.models.split(",") if m.strip()] or list(catalog)
        missing = [m for m in names if m not in catalog]
        if missing:
            raise SystemExit(f"unknown model(s) {missing}; catalog has {list(catalog)}")
        specs = [catalog[m].tiny() if args.tiny else catalog[m] for m in names]

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh, torch.inference_mode():
        sink = Sink(fh)
        deadline = Deadline(args.budget_s)
        argv_list = list(sys.argv[1:] if argv is None else argv)
        env = sink.write("env", **env_record(dev, dtype, argv_list))
        log(f"env: {env}")
        grouped_ok = bool(env.get("grouped_mm_run_dtype", env["grouped_mm"]))
        align = env.get("grouped_mm_run_align", env["grouped_mm_align"]) or 1
        ctx = Ctx(
            dev=dev,
            dtype=dtype,
            clock=Clock(dev, policy),
            sink=sink,
            deadline=deadline,
            plan=plan,
            grouped_ok=grouped_ok,
            align=int(align),
            seed=args.seed,
            parts=not args.no_parts,
            graphs=not args.no_graphs,
        )
        if "launch" in only:
            run_launch(ctx)
        if "memory" in only:
            run_memory(ctx)
        if "gemm" in only:
            run_gemm(ctx, specs)
        if "grouped" in only:
            run_grouped(ctx)
        if "layers" in only:
            run_layers(ctx, specs)
        log(f"done in {deadline.elapsed():.1f} s; records appended to {args.out}")
    summary(sink.records, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
