"""Fit an MoE layer's launch pipeline (:class:`moesim.config.profile.LaunchFit`) on the
GEMM, grouped-GEMM and per-expert-loop microbenchmarks and the calibration model's layers.

The microbenchmarks repeat one call back to back without synchronising, so the host runs
ahead of the device and each repetition takes max(host issue, device time); fitting their
sum (``moesim.calibrate.fit.fit_gemm``) lets the host's issue time stand in for device time
at medium sizes and fits too fast a device for large ones. Here, in order:

1. products: ``max(host, device fixed + p-norm(compute, memory))`` on the GEMM
   microbenchmarks (least squares on log time, best row tile);
2. grouped products: the same with their own efficiencies, on the grouped-GEMM ones;
3. a product inside a per-expert loop: ``call + max(issue x touched groups, device time)``
   on the loop microbenchmarks;

then, every calibration layer replayed by the simulator with its measured counts:

4. the device time of a kernel other than a product: the CUDA-graph layers with the fewest
   tokens, median of the floor that explains each;
5. the extra device time of an eager launch: the layers with the most tokens
   (device-bound), median of (eager - graph) per such kernel;
6. the host issue of the routing glue: the eager grouped layers with the fewest tokens
   (host-bound), the smallest of what each leaves to it;
7. the host read of the per-expert counts: the loop layers, the smallest residual (>= 0).

Host interference on a shared machine only adds time (the H100 host ran most of its
calibration layers up to 40% slower, see docs/fidelity.md), so the host costs of steps 6
and 7 are the smallest residuals, not the median ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from moesim.calibrate.records import Record, measured_s, of_kind
from moesim.config.profile import DeviceProfile, FitQuality, GemmFit, LaunchFit
from moesim.cost.compute import Roofline

GLUE_KERNELS = 18
"""Kernels of the measured layer's routing glue with top-1 routing
(``moesim.calibrate.torch_moe.MoELayer``) besides the router product, the dispatch gather
and the combine scatter, as ``torch.profiler`` lists them on an H200 (``python3 -m
moesim.calibrate.torch_kernels``, moesim/catalog/measurements/h200_moe_kernels_2026-12-03.jsonl):
the router's cast to float32, scaling, bias add, softmax, top-k, weight sum, division and
cast back (8; top-k > 1 adds a sort of the k choices:
:meth:`moesim.cost.compute.LaunchPipeline.glue_kernel_count`); the permutation's stable
sort (three device copies, an index fill, the sort), integer division and per-expert
offsets (7); the combine's weight gather, zero fill and weighting (3). A layer of
OLMoE-1B-7B then runs 28 kernels, Switch-Base-128 (top-1, not gated) 26."""
TILES = (1, 2, 4, 8, 16, 32, 64, 128)

Replay = Callable[[Record, DeviceProfile], float]


def _roofline(g: GemmFit, b: int, memory_bytes_per_s: float) -> Roofline:
    """Device time of products under ``g`` (its overheads are device time here)."""
    return Roofline(
        flops_per_s=g.flops_per_s,
        bytes_per_s=g.bytes_per_s,
        overhead_s=0.0,
        bytes_per_element=b,
        memory_bytes_per_s=memory_bytes_per_s,
        smoothness=g.smoothness,
        gemm_overhead_s=g.overhead_us * 1e-6,
        m_tile=g.m_tile,
        grouped_m_tile=g.grouped_m_tile,
        grouped_compute_factor=g.grouped_compute_factor,
        grouped_memory_factor=g.grouped_memory_factor,
        grouped_overhead_s=g.grouped_overhead_us * 1e-6,
        grouped_smoothness=g.grouped_smoothness,
    )


def _quality(pred: np.ndarray, meas: np.ndarray) -> FitQuality:
    err = np.abs(pred / meas - 1.0)
    return FitQuality(
        samples=int(err.size),
        median_abs_error=round(float(np.median(err)), 4),
        worst_abs_error=round(float(err.max()), 4),
    )


def fit_device_gemm(
    records: Sequence[Record], memory_bytes_per_s: float, b: int
) -> tuple[GemmFit, float, FitQuality]:
    """(device model of products, host issue per product in us, fit quality): least
    squares on log time of ``max(host, fixed + p-norm(2MKN / F, bytes / B))`` over the GEMM
    microbenchmarks, M rounded up to the best row tile; B at most the copy bandwidth."""
    from scipy.optimize import least_squares

    g = of_kind(records, "gemm")
    m, k, n = (np.array([r[x] for r in g], dtype=float) for x in ("M", "K", "N"))
    t = np.array([r["ms"] for r in g]) * 1e-3

    def fit_of(th: np.ndarray, tile: int) -> GemmFit:
        return GemmFit(
            flops_per_s=float(np.exp(th[0])),
            bytes_per_s=float(np.exp(th[1])),
            overhead_us=float(np.exp(th[2]) * 1e6),
            smoothness=1.0 + float(np.exp(th[3])),
            m_tile=tile,
        )

    def pred(th: np.ndarray, tile: int) -> np.ndarray:
        dev = np.asarray(_roofline(fit_of(th, tile), b, memory_bytes_per_s).gemm_s(m, k, n))
        return np.maximum(np.exp(th[4]), dev)

    hi = np.full(5, np.inf)
    hi[1] = np.log(memory_bytes_per_s)
    x0 = np.log([(2 * m * k * n / t).max(), 0.9 * memory_bytes_per_s, 5e-6, 1.0, t.min()])
    best = None
    for tile in TILES:
        res = least_squares(
            lambda th, tile=tile: np.log(pred(th, tile) / t), x0, bounds=(np.full(5, -np.inf), hi)
        )
        if best is None or res.cost < best[0].cost:
            best = (res, tile)
    if best is None:  # pragma: no cover - TILES is not empty
        raise ValueError("no tile candidate")
    th, tile = best[0].x, best[1]
    return fit_of(th, tile), float(np.exp(th[4]) * 1e6), _quality(pred(th, tile), t)


def fit_device_grouped(
    records: Sequence[Record], gemm: GemmFit, memory_bytes_per_s: float, b: int
) -> tuple[GemmFit, float]:
    """(``gemm`` with grouped products' row tile, efficiencies, extra fixed time and blend;
    host issue per grouped product in us): least squares on log time of ``max(host, device)``
    over the grouped-GEMM microbenchmarks, per candidate row tile; the best tile wins."""
    from scipy.optimize import least_squares

    recs = [r for r in of_kind(records, "grouped_gemm") if r.get("impl") == "grouped_mm"]
    recs = [r for r in recs if any(r["counts"])]
    if len(recs) < 5:
        raise ValueError("need at least 5 grouped_mm microbenchmarks for the launch fit")
    meas = np.array([r["ms"] for r in recs]) * 1e-3
    counts = [np.array([c for c in r["counts"] if c > 0], dtype=float) for r in recs]

    def fit_of(th: np.ndarray, tile: int) -> GemmFit:
        return gemm.model_copy(
            update={
                "grouped_m_tile": tile,
                "grouped_compute_factor": float(np.exp(th[0])),
                "grouped_memory_factor": float(np.exp(th[1])),
                "grouped_overhead_us": float(th[2]),
                "grouped_smoothness": 1.0 + float(np.exp(th[3])),
            }
        )

    def resid(th: np.ndarray, tile: int) -> np.ndarray:
        rf = _roofline(fit_of(th, tile), b, memory_bytes_per_s)
        dev = np.array([rf.grouped_product_s(c, r["K"], r["N"]) for c, r in zip(counts, recs)])
        return np.asarray(np.log(np.maximum(th[4] * 1e-6, dev) / meas))

    best: tuple[float, int, np.ndarray] | None = None
    for tile in TILES:
        res = least_squares(
            lambda th, tile=tile: resid(th, tile),
            np.array([0.0, 0.0, 1.0, 0.0, 20.0]),
            bounds=([-3.0, -3.0, 0.0, -5.0, 0.0], [0.5, 0.5, 1e4, 5.0, 1e4]),
        )
        if best is None or res.cost < best[0] - 1e-12:
            best = (float(res.cost), tile, res.x)
    if best is None:  # pragma: no cover - TILES is not empty
        raise ValueError("no tile candidate")
    return fit_of(best[2], best[1]), float(best[2][4])


def loop_product_host_us(
    records: Sequence[Record], gemm: GemmFit, memory_bytes_per_s: float, b: int
) -> float:
    """Host issue of one product of a per-expert loop, from the loop microbenchmarks: each
    takes ``call + max(issue x touched groups, sum of the products' device times)``; least
    squares on log time."""
    from scipy.optimize import least_squares

    recs = [r for r in of_kind(records, "grouped_gemm") if r.get("impl") == "loop"]
    recs = [r for r in recs if any(r["counts"])]
    if len(recs) < 3:
        raise ValueError("need at least 3 per-expert-loop microbenchmarks (grouped_gemm, loop)")
    rf = _roofline(gemm, b, memory_bytes_per_s)
    rows = [np.array([c for c in r["counts"] if c > 0], dtype=float) for r in recs]
    touched = np.array([len(c) for c in rows], dtype=float)
    device = np.array([float(np.sum(rf.gemm_s(c, r["K"], r["N"]))) for c, r in zip(rows, recs)])
    meas = np.array([r["ms"] for r in recs]) * 1e-3

    def resid(th: np.ndarray) -> np.ndarray:
        pred = th[0] * 1e-6 + np.maximum(touched * th[1] * 1e-6, device)
        return np.asarray(np.log(pred / meas))

    res = least_squares(resid, np.array([10.0, 10.0]), bounds=([0.0, 0.0], [1e4, 1e4]))
    return float(res.x[1])


def _fewest(recs: Sequence[Record]) -> list[Record]:
    least = min(r["tokens"] for r in recs)
    return [r for r in recs if r["tokens"] <= 4 * least]


def _most(recs: Sequence[Record]) -> list[Record]:
    most = max(r["tokens"] for r in recs)
    return [r for r in recs if r["tokens"] >= most / 16]


def fit_launch(
    records: Sequence[Record],
    profile: DeviceProfile,
    layers: Sequence[Record],
    replay: Replay,
    b: int,
) -> DeviceProfile:
    """``profile`` with its ``launch`` fit (see the module docstring for each step);
    ``layers``: the calibration model's measured layers (eager, with CUDA-graph replays)."""
    graph = [r for r in layers if r.get("ms_graph") and r.get("impl") == "grouped_mm"]
    eager_grouped = [dict(r, ms_graph=None) for r in layers if r.get("impl") == "grouped_mm"]
    loops = [dict(r, ms_graph=None) for r in layers if r.get("impl") == "loop"]
    if not graph:
        raise ValueError("the launch fit needs grouped calibration layers with CUDA-graph replays")
    mem = profile.memory_bytes_per_s
    gemm, product_host, gemm_quality = fit_device_gemm(records, mem, b)
    gemm, grouped_host = fit_device_grouped(records, gemm, mem, b)
    fit = LaunchFit(
        device_gemm=gemm,
        device_gemm_fit=gemm_quality,
        product_host_us=product_host,
        grouped_host_us=grouped_host,
        kernel_device_us=0.0,
        eager_device_us=0.0,
        glue_kernels=GLUE_KERNELS,
        glue_host_us=0.0,
        loop_product_host_us=loop_product_host_us(records, gemm, mem, b),
        host_sync_us=0.0,
        source="being fitted",
    )

    def at(r: Record, **values: float) -> float:
        return replay(r, profile.model_copy(update={"launch": fit.model_copy(update=values)}))

    # 4. device time per kernel: graph replays with the fewest tokens (linear in it)
    few = _fewest(graph)
    floors = []
    for r in few:
        t0 = at(r, kernel_device_us=0.0)
        per_us = (at(r, kernel_device_us=1.0) - t0) * 1e6
        floors.append((measured_s(r) - t0) * 1e6 / per_us)
    fit = fit.model_copy(update={"kernel_device_us": max(0.0, float(np.median(floors)))})
    # 5. eager minus graph per eagerly launched kernel, where the device is the bottleneck
    gaps = []
    for r in _most(graph):
        eager = dict(r, ms_graph=None)
        kernels = (at(eager, eager_device_us=1.0) - at(eager, eager_device_us=0.0)) * 1e6
        gaps.append((r["ms"] - r["ms_graph"]) * 1e3 / kernels)
    fit = fit.model_copy(update={"eager_device_us": max(0.0, float(np.median(gaps)))})
    # 6. host issue of the glue: eager grouped layers with the fewest tokens, where the
    # time is max(host, device) and the host part grows one for one with the glue
    big_us = 1e5
    glue = []
    for r in _fewest(eager_grouped):
        host0 = at(r, glue_host_us=big_us) - big_us * 1e-6
        glue.append((measured_s(r) - host0) * 1e6 if measured_s(r) > at(r) else 0.0)
    fit = fit.model_copy(update={"glue_host_us": max(0.0, float(np.min(glue)))})
    # 7. the host's read of the counts before a loop: the smallest loop residual
    if loops:
        resid = [(measured_s(r) - at(r)) * 1e6 for r in loops]
        fit = fit.model_copy(update={"host_sync_us": max(0.0, float(np.min(resid)))})
    names = ", ".join(sorted({r["model"] for r in layers}))
    source = (
        "device_gemm, product_host_us: the gemm records as max(host, device); "
        "grouped_*, grouped_host_us: the grouped_mm records; loop_product_host_us: the "
        f"grouped_gemm loop records; kernel_device_us: median over the {len(few)} "
        f"CUDA-graph layers of {names} with the fewest tokens; eager_device_us: median "
        "(eager - graph) per kernel over its layers with the most tokens; glue_host_us: "
        "smallest host residual of its eager grouped layers with the fewest tokens; "
        f"host_sync_us: smallest residual of its {len(loops)} loop layers; glue_kernels: "
        "torch.profiler's count, moesim/catalog/measurements/h200_moe_kernels_2026-12-03.jsonl "
        "(moesim.calibrate.launch_fit)"
    )
    return profile.model_copy(update={"launch": fit.model_copy(update={"source": source})})
