"""Measurements of this host with numpy: GEMMs, memory bandwidth, call overhead, and the
numpy reference MoE layer itself.

Shapes come from the model catalog. Full catalog widths would take minutes per layer on a
small host, so layer shapes are the catalog models with ``d_model`` and the FFN widths
divided by ``scale`` (experts, top-k and shared-expert counts kept): held-out layer shapes
for the fidelity report, measured with real arrays.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np

from moesim import catalog
from moesim.calibrate.records import Record, Writer
from moesim.config.model import ModelConfig
from moesim.rng import stream

DTYPE = np.float32
ROTATE_BYTES = 64 << 20


@dataclass(frozen=True)
class Size:
    """How much to measure."""

    scale: int
    """Model widths are divided by this for layer measurements."""
    gemm_m: tuple[int, ...]
    tokens: tuple[int, ...]
    max_gflop: float
    """Skip GEMMs and layers above this many GFLOP (keeps each timing short)."""
    fit_models: tuple[str, ...]
    """Layers measured for calibration (fitting the per-layer routing glue)."""
    heldout_models: tuple[str, ...]
    """Layers measured for the fidelity report (never used to fit)."""
    min_time_s: float


SIZES = {
    "ci": Size(
        16,
        (1, 8, 64, 512, 2048),
        (1, 16, 128, 1024),
        1.0,
        ("olmoe-1b-7b",),
        ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"),
        0.05,
    ),
    "full": Size(
        4,
        (1, 4, 16, 64, 256, 1024, 4096),
        (1, 4, 16, 64, 256, 1024, 4096),
        30.0,
        ("olmoe-1b-7b",),
        (
            "mixtral-8x7b",
            "mixtral-8x22b",
            "qwen1.5-moe-a2.7b",
            "deepseek-v2-lite",
            "deepseek-v3",
            "dbrx",
            "switch-base-128",
        ),
        0.2,
    ),
}


def timed(fn: Callable[[], object], min_time_s: float, max_reps: int = 50) -> float:
    """Fastest wall time of ``fn`` in seconds over repeats, after one warm-up call.

    The minimum, not the median: on a shared virtual machine, time stolen by neighbours
    only ever adds, so the fastest repeat is the most reproducible estimate of the work.
    """
    fn()
    times: list[float] = []
    total = 0.0
    while len(times) < 3 or (total < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return float(np.min(times))


def _product(x: np.ndarray, weights: list[np.ndarray], i: int) -> np.ndarray:
    """``x`` times the i-th weight copy (cycling)."""
    return x @ weights[i % len(weights)]


def _rotating(fn: Callable[[int], object]) -> Callable[[], object]:
    """A zero-argument call that passes 0, 1, 2, ... to ``fn`` on successive calls."""
    calls = iter(range(1 << 62))
    return lambda: fn(next(calls))


def scaled_model(name: str, scale: int) -> ModelConfig:
    """A catalog model with its widths divided by ``scale`` (counts kept), in fp32."""
    from moesim.catalog import raw_preset

    raw = raw_preset("models", name)
    m = ModelConfig.model_validate(raw)
    changes: dict[str, Any] = {
        "d_model": max(8, m.d_model // scale),
        "expert_d_ff": max(8, m.expert_d_ff // scale),
        "dtype": "fp32",
    }
    if m.shared_expert_d_ff is not None:
        changes["shared_expert_d_ff"] = max(8, m.shared_expert_d_ff // scale)
    if m.dense_d_ff is not None:
        changes["dense_d_ff"] = max(8, m.dense_d_ff // scale)
    if m.attention != "mla":
        changes["head_dim"] = m.head_dim_resolved
    return ModelConfig.model_validate({**raw, **changes})


def gemm_shapes(scale: int) -> list[tuple[int, int]]:
    """(K, N) pairs of the catalog's expert and router products, widths divided by scale."""
    pairs: set[tuple[int, int]] = set()
    for name in catalog.names("models"):
        m = scaled_model(name, scale)
        up = (2 if m.is_gated else 1) * m.expert_d_ff
        pairs |= {(m.d_model, up), (m.expert_d_ff, m.d_model), (m.d_model, m.experts)}
    return sorted(pairs)


def measure_env(w: Writer) -> None:
    w.add(
        {
            "kind": "env",
            "backend": "numpy",
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": _cpu_name(),
            "date": datetime.now(UTC).date().isoformat(),
        }
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure_gemms(w: Writer, size: Size, rng: np.random.Generator) -> None:
    for k, n in gemm_shapes(size.scale):
        # rotate over enough weight copies to overflow the caches, as a layer's experts do
        copies = int(min(64, max(1, -(-ROTATE_BYTES // (4 * k * n)))))
        weights = [rng.standard_normal((k, n), dtype=DTYPE) for _ in range(copies)]
        for m in size.gemm_m:
            if 2.0 * m * k * n / 1e9 > size.max_gflop:
                continue
            x = rng.standard_normal((m, k), dtype=DTYPE)
            t = timed(_rotating(partial(_product, x, weights)), size.min_time_s)
            w.add(
                {
                    "kind": "gemm",
                    "M": m,
                    "K": k,
                    "N": n,
                    "dtype": "fp32",
                    "ms": t * 1e3,
                    "tflops": 2.0 * m * k * n / t / 1e12,
                }
            )


def measure_memory(w: Writer, size: Size, rng: np.random.Generator) -> None:
    for nbytes in (16 << 20, 64 << 20, 256 << 20):
        a = rng.standard_normal(nbytes // 4, dtype=DTYPE)
        b = np.empty_like(a)
        t = timed(partial(np.copyto, b, a), size.min_time_s)
        w.add({"kind": "copy", "bytes": nbytes, "ms": t * 1e3, "gbps_rw": 2 * nbytes / t / 1e9})


def measure_elementwise(w: Writer, size: Size, rng: np.random.Generator) -> None:
    """The reference's activation functions and its dispatch gather / combine scatter."""
    from moesim.reference.dispatch import build_plan, gather, scatter_combine
    from moesim.reference.functional import gelu, relu, silu

    n = 1 << 21
    x = rng.standard_normal(n, dtype=DTYPE)
    for name, fn in (("silu", silu), ("gelu", gelu), ("relu", relu)):
        t = timed(partial(fn, x), size.min_time_s)
        w.add({"kind": "activation", "function": name, "elements": n, "ms": t * 1e3})
    tokens, k, width, experts = 8192, 4, 128, 16
    expert = rng.integers(0, experts, size=(tokens, k)).astype(np.int32)
    weight = rng.random((tokens, k)).astype(DTYPE)
    plan = build_plan(expert, weight, experts)
    xs = rng.standard_normal((tokens, width), dtype=DTYPE)
    buf = gather(xs, plan)
    t = timed(lambda: gather(xs, plan), size.min_time_s)
    w.add({"kind": "gather", "rows": tokens * k, "width": width, "ms": t * 1e3})
    t = timed(lambda: scatter_combine(buf, plan, tokens), size.min_time_s)
    w.add({"kind": "scatter", "rows": tokens * k, "width": width, "ms": t * 1e3})


def measure_overhead(w: Writer) -> None:
    a = np.ones((1, 1), dtype=DTYPE)
    calls = 2000
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ a
    dt = time.perf_counter() - t0
    w.add({"kind": "launch", "us_per_kernel": dt / calls * 1e6})


def layer_record(
    model: ModelConfig, name: str, tokens: int, routing: str, seed: int, min_time_s: float
) -> Record:
    """Time the numpy reference layer on ``tokens`` tokens with uniform or Zipf(1) routing."""
    from moesim.reference.layer import ReferenceLayer, RoutingSpec, forward

    rng = stream(seed, "calibrate-layer")
    # As in a model of many layers, a layer's weights are not still in cache when it runs
    # again: rotate over enough independent copies to overflow the caches.
    weight_bytes = (
        model.experts * (3 if model.is_gated else 2) * model.d_model * model.expert_d_ff * 4
    )
    copies = int(min(8, max(1, -(-ROTATE_BYTES // weight_bytes))))
    layers = [
        ReferenceLayer.random(
            rng,
            d_model=model.d_model,
            d_ff=model.expert_d_ff,
            experts=model.experts,
            top_k=model.top_k,
            activation=model.activation,
            shared_experts=model.shared_experts,
            shared_d_ff=model.shared_d_ff if model.shared_experts else None,
            dtype=DTYPE,
        )
        for _ in range(copies)
    ]
    # Routing with a known popularity: feature 0 of every token is 1 and its router row is
    # log(p); the other features add noise with the spread of Gumbel noise (pi / sqrt(6)).
    p = np.ones(model.experts) if routing == "uniform" else 1.0 / np.arange(1, model.experts + 1)
    p = p / p.sum()
    d = model.d_model
    w_router = rng.standard_normal((d, model.experts)).astype(DTYPE) * np.float32(
        (np.pi / np.sqrt(6.0)) / np.sqrt(d - 1)
    )
    w_router[0] = np.log(p)
    layers = [dataclasses.replace(layer, w_router=w_router) for layer in layers]
    x = rng.standard_normal((tokens, d)).astype(DTYPE)
    x[:, 0] = 1.0
    spec = RoutingSpec(kind="topk", overflow="dropless")
    out = forward(layers[0], x, spec)

    def run(i: int) -> object:
        return forward(layers[i % copies], x, spec)

    t = timed(_rotating(run), min_time_s, max_reps=20)
    return {
        "kind": "moe_layer",
        "backend": "numpy",
        "model": name,
        "impl": "loop",
        "tokens": tokens,
        "routing": routing,
        "seed": seed,
        "scale": None,
        "experts": model.experts,
        "top_k": model.top_k,
        "d_model": model.d_model,
        "expert_d_ff": model.expert_d_ff,
        "activation": model.activation,
        "shared_experts": model.shared_experts,
        "shared_expert_d_ff": model.shared_d_ff,
        "counts": [int(c) for c in out.route.counts],
        "ms": t * 1e3,
    }


def measure_layers(
    w: Writer, size: Size, models: tuple[str, ...], seed: int, progress: Callable[[str], None]
) -> None:
    """Time whole MoE layers of each model that fits this size; ``progress`` gets one
    ``[k/n] ...`` line per layer timed (a bar with ETA on a terminal)."""
    jobs = []
    for name in models:
        model = scaled_model(name, size.scale)
        weight_gib = (
            model.experts
            * (3 if model.is_gated else 2)
            * model.d_model
            * model.expert_d_ff
            * 4
            / 2**30
        )
        if weight_gib > 4:
            w.add({"kind": "skipped", "model": name, "reason": f"{weight_gib:.1f} GiB of experts"})
            continue
        for tokens in size.tokens:
            flops = (
                2.0
                * tokens
                * model.top_k
                * (3 if model.is_gated else 2)
                * model.d_model
                * model.expert_d_ff
            )
            if flops / 1e9 > size.max_gflop:
                continue
            jobs += [(name, model, tokens, routing) for routing in ("uniform", "zipf1")]
    for k, (name, model, tokens, routing) in enumerate(jobs, 1):
        rec = layer_record(model, name, tokens, routing, seed, size.min_time_s)
        rec["scale"] = size.scale
        w.add(rec)
        progress(f"[{k}/{len(jobs)}] {name} T={tokens} {routing}: {rec['ms']:.2f} ms")


def measure_host(
    w: Writer, size: Size, seed: int = 0, progress: Callable[[str], None] = lambda s: None
) -> None:
    """Everything calibration needs from this host (GEMMs, memory, overhead, fit layers)."""
    rng = stream(seed, "calibrate")
    measure_env(w)
    measure_overhead(w)
    measure_memory(w, size, rng)
    measure_elementwise(w, size, rng)
    measure_gemms(w, size, rng)
    progress(f"{len(w.records)} primitive measurements")
    measure_layers(w, size, size.fit_models, seed, progress)
