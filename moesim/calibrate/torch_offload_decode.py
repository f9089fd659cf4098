"""Measure batch-1 offloaded decode on one GPU, driven by a routing trace recorded in the
same run: ms/token and the HBM hit rate of an LRU expert cache at several sizes.

1. **Record** (:mod:`moesim.calibrate.torch_routing`): a Mixtral-8x7B-shaped transformers
   model with ``--layers`` layers, random weights and a seeded per-expert router bias
   (``--router-bias-std``), serves ``--prompts`` synthetic prompts one after another
   (prefill, then ``--decode-tokens`` sampled decode steps each). The trace is written
   as ``DIR/TRACE.jsonl``/``.npz``/``.env.json`` and its decode tokens alone as
   ``DIR/TRACE.decode.jsonl`` (what the offload runs replay, in order).
2. **Replay** on a lean decoder of the same shape (random bf16 weights, written for this
   harness so the measured work is the model's and nothing else): per layer RMSNorm,
   fused QKV product, RoPE, ``scaled_dot_product_attention`` over a KV cache (GQA),
   output product, residual, RMSNorm, router product, softmax and top-2 (computed and
   read on the host, ``.tolist()``, as an offloading runtime must read them to know what
   to fetch: a device-to-host synchronisation per layer), then the **trace's** two
   experts (weights: the router's probabilities at those ids, renormalised) in a
   per-expert loop (``silu(x W1) * (x W3) W2``, weighted, summed), then the residual; a
   final RMSNorm and the LM head per token. Every expert of every layer lives in pinned
   host memory (one buffer per expert); HBM holds ``slots`` expert slots split evenly over
   the layers (``slots // layers`` each, the first ``slots % layers`` layers one more:
   moesim's per-layer split), each layer's part an LRU over its experts, filled at the
   start hottest first by the decode trace's per-layer popularity (moesim's start-up
   fill). A layer's misses are copied one after another on a second CUDA stream, which
   starts when the layer's MoE part does (``wait_stream``); the resident experts compute
   first, then each missing expert as soon as its copy has landed (``wait_event``): the
   ``overlap`` rule of :mod:`moesim.cost.offload`. A miss evicts the layer's least
   recently used expert that the layer itself does not use. Uses are processed in
   ascending expert id per layer, as moesim's cache does.

Runs (each over the same first ``--tokens`` decode tokens of the trace, context starting at
``--context`` cached tokens): ``lru`` at every ``--slots`` (the largest, layers x experts,
is the all-hit case: nothing is ever copied), ``--repeats`` times each, in the order
given or, with ``--order-seed``, in a seeded shuffle whose first run is never the smallest
slot count (the first run after pinning the host buffers is not the one that decides the
most copy-bound case); each ``lru`` record carries its position (``run_index``), its
misses per token, and a **copy-rate probe** taken just before and just after it
(``--probe-copies`` expert copies from pinned host buffers spread over the layers, each
timed with events: median ms and GB/s, min and max). A ``copy_sweep`` (every host expert
copied once, each timed) is recorded before the first run and after the last.
``--trace FILE`` replays an earlier recorded decode trace (JSON lines) instead of
recording one, so a re-measurement drives the same accesses. Plus all-hit variants that
separate the
costs: ``all_hit_nosync`` (the trace's experts without reading the router on the host),
``all_hit_graph`` (one token with fixed experts captured as a CUDA graph and replayed:
the device time alone) and ``attention_only`` (no MoE part). Also ``copy`` (one expert
from pinned memory) and ``expert`` (one expert's forward, one token). Times: one CUDA
event pair per token (eager), mean and median over tokens. Written as JSON lines in
``DIR/offload_decode.jsonl`` (an ``env`` record first). ``--cpu --tiny`` is a dry run of
every path with shrunk widths on the CPU (no streams, synchronous copies).

    python3 -m moesim.calibrate.torch_offload_decode --out DIR --router-bias-std 1.0
    python3 -m moesim.calibrate.torch_offload_decode --out DIR \
        --trace scenarios/traces/mixtral-l8-h200.decode.jsonl --repeats 2 --order-seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import OrderedDict
from typing import Any

from moesim.calibrate.torch_routing import SHAPES, TINY, Trace, env_record, record_hf, save


def split_slots(slots: int, layers: int) -> list[int]:
    """moesim's per-layer split of ``slots`` (``Partitioned``)."""
    return [slots // layers + (1 if j < slots % layers else 0) for j in range(layers)]


def hottest(trace: Trace, layers: int, experts: int) -> list[list[int]]:
    """Per layer, the experts by decreasing use count over the trace (ties: lower id)."""
    counts = [[0] * experts for _ in range(layers)]
    for tok in trace.experts:
        for j, ids in enumerate(tok):
            for e in ids:
                counts[j][e] += 1
    return [sorted(range(experts), key=lambda e: (-c[e], e)) for c in counts]


class LayerCache:
    """One layer's LRU part: expert -> slot, least recently used first."""

    def __init__(self, capacity: int, free: list[int], warm: list[int]) -> None:
        self.capacity = capacity
        self.free = list(free)
        self.lru: OrderedDict[int, int] = OrderedDict()
        for e in reversed(warm[:capacity]):  # the coldest of the fill is the first to go
            self.lru[e] = self.free.pop()

    def use(self, keys: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Uses of ``keys`` (ascending ids): (hit experts, [(missing expert, its slot)])."""
        hits, misses = [], []
        protect = set(keys)
        for e in keys:
            if e in self.lru:
                self.lru.move_to_end(e)
                hits.append(e)
                continue
            if self.free:
                slot = self.free.pop()
            else:
                victim = next((k for k in self.lru if k not in protect), next(iter(self.lru)))
                slot = self.lru.pop(victim)
            self.lru[e] = slot
            misses.append((e, slot))
        return hits, misses


class Decoder:
    """The lean Mixtral-shaped decoder with offloaded experts (see the module docstring)."""

    def __init__(self, keys: dict[str, Any], layers: int, max_slots: int, dev: Any, ctx: int):
        import torch

        self.torch = torch
        self.dev = dev
        self.cuda = dev.type == "cuda"
        dt = torch.bfloat16 if self.cuda else torch.float32
        self.dt = dt
        d, f = keys["hidden_size"], keys["intermediate_size"]
        h, kvh = keys["num_attention_heads"], keys["num_key_value_heads"]
        self.d, self.f, self.h, self.kvh, self.hd = d, f, h, kvh, d // h
        self.layers, self.experts = layers, keys["num_local_experts"]
        self.vocab = keys["vocab_size"]
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(*shape: int, std: float = 0.02) -> Any:
            return (torch.randn(*shape, generator=g, device=dev) * std).to(dt)

        self.wqkv = [rnd(d, (h + 2 * kvh) * self.hd) for _ in range(layers)]
        self.wo = [rnd(d, d) for _ in range(layers)]
        self.wr = [rnd(d, self.experts) for _ in range(layers)]
        self.n1 = [torch.ones(d, device=dev, dtype=dt) for _ in range(layers)]
        self.n2 = [torch.ones(d, device=dev, dtype=dt) for _ in range(layers)]
        self.nf = torch.ones(d, device=dev, dtype=dt)
        self.embed = rnd(self.vocab, d)
        self.head = rnd(d, self.vocab)
        self.max_pos = ctx + 4096
        self.kc = [
            torch.zeros(1, kvh, self.max_pos, self.hd, device=dev, dtype=dt) for _ in range(layers)
        ]
        self.vc = [
            torch.zeros(1, kvh, self.max_pos, self.hd, device=dev, dtype=dt) for _ in range(layers)
        ]
        for c in self.kc + self.vc:
            c[:, :, :ctx].normal_(0.0, 1.0, generator=g)
        inv = 1.0 / (1e6 ** (torch.arange(0, self.hd, 2, device=dev).float() / self.hd))
        ang = torch.arange(self.max_pos, device=dev).float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(dt), ang.sin().to(dt)
        self.elems = 3 * d * f
        self.expert_bytes = self.elems * (2 if self.cuda else 4)
        # every expert in (pinned) host memory; HBM slots
        distinct = [rnd(self.elems) for _ in range(4)]
        self.host = [
            [torch.empty(self.elems, dtype=dt, pin_memory=self.cuda) for _ in range(self.experts)]
            for _ in range(layers)
        ]
        for j in range(layers):
            for e in range(self.experts):
                self.host[j][e].copy_(distinct[(j + e) % 4])
        del distinct
        self.slots = torch.empty(max_slots, self.elems, device=dev, dtype=dt)
        self.copy_stream = torch.cuda.Stream() if self.cuda else None

    def weights(self, slot: int) -> tuple[Any, Any, Any]:
        d, f = self.d, self.f
        b = self.slots[slot]
        return b[: d * f].view(d, f), b[d * f : 2 * d * f].view(d, f), b[2 * d * f :].view(f, d)

    def ffn(self, x: Any, slot: int) -> Any:
        w1, w3, w2 = self.weights(slot)
        F = self.torch.nn.functional
        return (F.silu(x @ w1) * (x @ w3)) @ w2

    def attention(self, x: Any, j: int, pos: int) -> Any:
        torch, F = self.torch, self.torch.nn.functional
        h, kvh, hd = self.h, self.kvh, self.hd
        y = F.rms_norm(x, (self.d,), self.n1[j], 1e-5)
        q, k, v = (y @ self.wqkv[j]).split([h * hd, kvh * hd, kvh * hd], dim=-1)
        q, k, v = q.view(1, h, 1, hd), k.view(1, kvh, 1, hd), v.view(1, kvh, 1, hd)
        cos, sin = self.cos[pos], self.sin[pos]

        def rope(t: Any) -> Any:
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

        q, k = rope(q), rope(k)
        self.kc[j][:, :, pos : pos + 1] = k
        self.vc[j][:, :, pos : pos + 1] = v
        o = F.scaled_dot_product_attention(
            q, self.kc[j][:, :, : pos + 1], self.vc[j][:, :, : pos + 1], enable_gqa=True
        )
        return x + o.reshape(1, self.d) @ self.wo[j]

    def token(
        self,
        tok: int,
        pos: int,
        experts: list[list[int]],
        caches: list[LayerCache] | None,
        sync: bool = True,
        moe: bool = True,
        fixed: list[list[int]] | None = None,
    ) -> tuple[int, int]:
        """One decode step; returns (uses, hits). ``fixed``: per layer the slots to use
        (graph capture: no cache, no host reads)."""
        torch = self.torch
        x = self.embed[tok : tok + 1]
        uses = hits = 0
        for j in range(self.layers):
            x = self.attention(x, j, pos)
            if not moe:
                continue
            y = self.torch.nn.functional.rms_norm(x, (self.d,), self.n2[j], 1e-5)
            probs = torch.softmax((y @ self.wr[j]).float(), dim=-1)
            top = torch.topk(probs, 2, dim=-1).indices
            if fixed is not None:
                order = [(e, s, None) for e, s in zip(experts[j], fixed[j])]
            else:
                if sync:
                    top.tolist()  # the runtime reads the router's choice to fetch experts
                assert caches is not None
                keys = sorted(experts[j])
                hit, miss = caches[j].use(keys)
                uses += len(keys)
                hits += len(hit)
                order = [(e, caches[j].lru[e], None) for e in hit]
                if miss:
                    order += self._fetch(j, miss)
            sel = [probs[0, e] for e, _, _ in order]  # views: no host-to-device copy
            inv = 1.0 / sum(sel[1:], sel[0])
            out = None
            for i, (_, slot, ev) in enumerate(order):
                if ev is not None:
                    torch.cuda.current_stream().wait_event(ev)
                o = self.ffn(y, slot) * (sel[i] * inv)
                out = o if out is None else out + o
            x = x + out
        x = torch.nn.functional.rms_norm(x, (self.d,), self.nf, 1e-5)
        x @ self.head
        return uses, hits

    def _fetch(self, j: int, miss: list[tuple[int, int]]) -> list[tuple[int, int, Any]]:
        torch = self.torch
        out = []
        if self.copy_stream is None:  # CPU dry run: synchronous copies
            for e, slot in miss:
                self.slots[slot].copy_(self.host[j][e])
                out.append((e, slot, None))
            return out
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            for e, slot in miss:
                self.slots[slot].copy_(self.host[j][e], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
                out.append((e, slot, ev))
        return out

    def load(self, caches: list[LayerCache]) -> None:
        """Copy each cache's start-up fill into its slots (untimed)."""
        for j, c in enumerate(caches):
            for e, slot in c.lru.items():
                self.slots[slot].copy_(self.host[j][e])
        self.sync()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class Clock:
    """Per-token times: CUDA events (GPU) or perf_counter (CPU), ms."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch, self.cuda = torch, cuda
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def run_lru(
    dec: Decoder,
    trace: Trace,
    slots: int,
    hot: list[list[int]],
    tokens: int,
    ctx: int,
    sync: bool = True,
    moe: bool = True,
) -> dict[str, Any]:
    """One timed decode over the trace's first ``tokens`` tokens with ``slots`` slots."""
    per = split_slots(slots, dec.layers)
    free, caches = list(range(slots)), []
    for j, n in enumerate(per):
        caches.append(LayerCache(n, free[:n], hot[j]))
        free = free[n:]
    dec.load(caches)
    clock = Clock(dec.cuda)
    uses = hits = 0
    misses = []
    clock.mark()
    for t in range(tokens):
        u, h = dec.token(t % dec.vocab, ctx + t, trace.experts[t], caches, sync=sync, moe=moe)
        uses, hits = uses + u, hits + h
        misses.append(u - h)
        clock.mark()
    ms = clock.ms()
    return {
        "slots": slots,
        "slots_per_layer": per,
        "tokens": tokens,
        "accesses": uses,
        "hits": hits,
        "hit_rate": hits / uses if uses else None,
        "ms_per_token": sum(ms) / len(ms),
        "median_ms": statistics.median(ms),
        "ms": [round(x, 4) for x in ms],
        "misses": misses,
    }


def copy_times(dec: Decoder, buffers: list[tuple[int, int]]) -> list[float]:
    """ms of each copy of host expert ``(layer, expert)`` into slot 0, one at a time
    (events around each on the copy stream; the caller reloads the slots afterwards)."""
    torch = dec.torch
    dec.sync()
    out = []
    for j, e in buffers:
        if not dec.cuda:
            t0 = time.perf_counter()
            dec.slots[0].copy_(dec.host[j][e])
            out.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        assert dec.copy_stream is not None
        with torch.cuda.stream(dec.copy_stream):
            a.record(dec.copy_stream)
            dec.slots[0].copy_(dec.host[j][e], non_blocking=True)
            b.record(dec.copy_stream)
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def rate(dec: Decoder, ms: list[float]) -> dict[str, Any]:
    """A copy-rate summary: median/min/max ms per expert copy and the median GB/s."""
    med = statistics.median(ms)
    return {
        "copies": len(ms),
        "median_ms": round(med, 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
        "gb_per_s": round(dec.expert_bytes / med / 1e6, 3),
    }


def probe(dec: Decoder, copies: int, start: int) -> dict[str, Any]:
    """Copy-rate probe: ``copies`` host experts spread over the layers (a stride through
    every (layer, expert) pair starting at ``start``, so successive probes read different
    buffers)."""
    n = dec.layers * dec.experts
    picks = [((start + 7 * i) % n) for i in range(copies)]
    return rate(dec, copy_times(dec, [(p // dec.experts, p % dec.experts) for p in picks]))


def run_order(slots: list[int], repeats: int, seed: int | None) -> list[int]:
    """The timed ``lru`` runs in order: every slot count ``repeats`` times; with ``seed``,
    a seeded shuffle whose first run is not the smallest slot count (when there is
    another)."""
    runs = [s for s in slots for _ in range(repeats)]
    if seed is None:
        return runs
    rng = random.Random(seed)
    rng.shuffle(runs)
    if runs[0] == min(runs) and max(runs) != min(runs):
        first = next(i for i, s in enumerate(runs) if s != runs[0])
        runs[0], runs[first] = runs[first], runs[0]
    return runs


def load_trace(path: str) -> Trace:
    """A decode trace written by :func:`moesim.calibrate.torch_routing.write_trace`
    (JSON lines: ``step``, ``experts``, optional ``weights``)."""
    out = Trace()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            out.experts.append(row["experts"])
            out.weights.append(row.get("weights", []))
            out.step.append(int(row.get("step", len(out.step))))
            out.decode.append(True)
    return out


def run_graph(dec: Decoder, trace: Trace, tokens: int, ctx: int) -> dict[str, Any]:
    """All experts resident, one token's step captured as a CUDA graph and replayed."""
    torch = dec.torch
    ordered = [sorted(ids) for ids in trace.experts[0]]
    caches = [
        LayerCache(
            dec.experts,
            list(range(j * dec.experts, (j + 1) * dec.experts)),
            list(range(dec.experts)),
        )
        for j in range(dec.layers)
    ]
    dec.load(caches)
    fixed = [[caches[j].lru[e] for e in ids] for j, ids in enumerate(ordered)]
    step = lambda: dec.token(0, ctx, ordered, None, fixed=fixed)  # noqa: E731
    if dec.cuda:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step = graph.replay
    clock = Clock(dec.cuda)
    clock.mark()
    for _ in range(tokens):
        step()
        clock.mark()
    ms = clock.ms()
    return {
        "slots": dec.layers * dec.experts,
        "tokens": tokens,
        "ms_per_token": sum(ms) / len(ms),
        "median_ms": statistics.median(ms),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--slots", default="16,32,48,64")
    ap.add_argument("--tokens", type=int, default=160, help="decode tokens timed per run")
    ap.add_argument("--context", type=int, default=64, help="cached tokens at the start")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=96, help="recorded per prompt")
    ap.add_argument("--router-bias-std", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace-name", default="mixtral-l8")
    ap.add_argument("--trace", help="replay this decode trace (JSON lines) instead of recording")
    ap.add_argument("--repeats", type=int, default=1, help="timed lru runs per slot count")
    ap.add_argument("--order-seed", type=int, default=None, help="shuffle the lru runs (seeded)")
    ap.add_argument("--probe-copies", type=int, default=6, help="copies per copy-rate probe")
    ap.add_argument("--records", default="offload_decode.jsonl", help="records file in --out")
    ap.add_argument(
        "--bracket",
        action="store_true",
        help="before every timed lru run, an attention_only run (the host time's fit) of the"
        " same tokens: the drift's own control",
    )
    ap.add_argument(
        "--warmup-run",
        action="store_true",
        help="one untimed-for-comparison lru run of every token at the first slot count"
        " before the timed runs (recorded as mode warmup)",
    )
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    import os

    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.cpu else "cuda"
    argv_full = ["-m", "moesim.calibrate.torch_offload_decode", *argv]
    if args.trace:
        decode = load_trace(args.trace)
        files = [args.trace]
    else:
        trace, info = record_hf(
            "mixtral-8x7b",
            args.layers,
            prompts=args.prompts,
            prompt_tokens=args.prompt_tokens,
            decode_tokens=args.decode_tokens,
            bias_std=args.router_bias_std,
            seed=args.seed,
            device=device,
            tiny=args.tiny,
        )
        files = save(trace, info, os.path.join(args.out, args.trace_name), argv_full, True)
        decode = trace.subset(trace.decode)
    tokens = min(args.tokens, len(decode.step))
    keys = {k: v for k, v in SHAPES["mixtral-8x7b"].items() if k != "config"}
    if args.tiny:
        keys.update({k: v for k, v in TINY.items() if k in keys})
    slots = sorted(int(s) for s in args.slots.split(","))
    dev = torch.device(device)
    t0 = time.perf_counter()
    dec = Decoder(keys, args.layers, max(slots), dev, args.context)
    setup_s = time.perf_counter() - t0
    order = run_order(slots, args.repeats, args.order_seed)
    hot = hottest(decode, args.layers, dec.experts)
    out = open(os.path.join(args.out, args.records), "w", encoding="utf-8")  # noqa: SIM115
    env = env_record(
        argv_full,
        kind="env",
        d_model=dec.d,
        d_ff=dec.f,
        layers=args.layers,
        experts=dec.experts,
        expert_bytes=dec.expert_bytes,
        context=args.context,
        trace_files=[os.path.basename(p) for p in files],
        trace=(
            os.path.basename(args.trace)
            if args.trace
            else os.path.basename(files[0]).replace(".jsonl", ".decode.jsonl")
        ),
        trace_replayed=bool(args.trace),
        router_bias_std=None if args.trace else args.router_bias_std,
        seed=args.seed,
        device=device,
        setup_s=round(setup_s, 3),
        run_order=order,
    )

    def emit(rec: dict[str, Any]) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print({k: v for k, v in rec.items() if k not in ("ms", "misses", "argv", "hf_config")})

    emit(env)
    # warm-up (kernels, cuBLAS handles), then the measurements
    run_lru(dec, decode, max(slots), hot, min(8, tokens), args.context)
    clock = Clock(dec.cuda)
    clock.mark()
    for _ in range(5):
        dec.slots[0].copy_(dec.host[0][0], non_blocking=True)
        clock.mark()
    emit(
        {
            "kind": "copy",
            "mem": "pinned" if dec.cuda else "cpu",
            "bytes": dec.expert_bytes,
            "median_ms": statistics.median(clock.ms()),
        }
    )
    x = torch.randn(1, dec.d, device=dev, dtype=dec.dt)
    clock = Clock(dec.cuda)
    dec.ffn(x, 0)
    clock.mark()
    for _ in range(20):
        dec.ffn(x, 0)
        clock.mark()
    emit({"kind": "expert", "tokens": 1, "median_ms": statistics.median(clock.ms())})
    every = [(j, e) for j in range(args.layers) for e in range(dec.experts)]
    emit({"kind": "copy_sweep", "when": "before", **rate(dec, copy_times(dec, every))})
    if args.warmup_run and order:
        emit(
            {
                "kind": "offload_decode",
                "mode": "warmup",
                "sync": True,
                **run_lru(dec, decode, order[0], hot, tokens, args.context),
            }
        )
    for i, s in enumerate(order):
        if args.bracket:
            emit(
                {
                    "kind": "offload_decode",
                    "mode": "attention_only",
                    "sync": False,
                    "run_index": i,
                    "bracket": True,
                    **run_lru(dec, decode, max(slots), hot, tokens, args.context, moe=False),
                }
            )
        before = probe(dec, args.probe_copies, 2 * i * args.probe_copies)
        rec = run_lru(dec, decode, s, hot, tokens, args.context)
        after = probe(dec, args.probe_copies, (2 * i + 1) * args.probe_copies)
        emit(
            {
                "kind": "offload_decode",
                "mode": "lru",
                "sync": True,
                "run_index": i,
                **rec,
                "probe_before": before,
                "probe_after": after,
            }
        )
    emit({"kind": "copy_sweep", "when": "after", **rate(dec, copy_times(dec, every))})
    full = args.layers * dec.experts
    if full in slots:
        emit(
            {
                "kind": "offload_decode",
                "mode": "all_hit_nosync",
                "sync": False,
                **run_lru(dec, decode, full, hot, tokens, args.context, sync=False),
            }
        )
        emit(
            {
                "kind": "offload_decode",
                "mode": "attention_only",
                "sync": False,
                **run_lru(dec, decode, full, hot, tokens, args.context, moe=False),
            }
        )
        emit(
            {
                "kind": "offload_decode",
                "mode": "all_hit_graph",
                **run_graph(dec, decode, tokens, args.context),
            }
        )
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
