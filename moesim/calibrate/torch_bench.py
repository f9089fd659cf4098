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
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from moesim.calibrate.torch_moe import (  # noqa: F401
    LayerSpec,
    MoELayer,
    check_layer,
    gemm_shapes,
    group_counts,
    grouped_mm,
    load_models,
    popularity,
    probe_grouped_mm,
)
from moesim.calibrate.torch_moe_consts import (
    GEMM_MAX_BYTES,
    MEM_FRACTION,
    SECTIONS,
    WEIGHT_STD,
)
from moesim.calibrate.torch_timing import (
    DTYPE_NAMES,
    DTYPES,
    Clock,
    Deadline,
    Sink,
    TimingPolicy,
    _free,
    _gen,
    _randn,
    device_memory,
    fixed,
    l2_bytes,
    log,
)


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
