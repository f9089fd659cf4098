"""Data-parallel versus expert-parallel training steps on the GPUs of one host (issues
#11 and #17), measured.

One process per GPU (PyTorch + NCCL; NVLink multicast stays off), each holding the decoder
stack of :mod:`moesim.calibrate.torch_train` (catalog widths, fewer layers, random
weights) and ``tokens`` tokens of its own per step:

- ``dp``: every rank holds every expert; all gradients are all-reduced;
- ``ep``: rank r holds experts ``[r E / W, (r + 1) E / W)``; a MoE layer sorts its
  (token, choice) rows by expert, exchanges the per-expert counts (one
  ``all_to_all_single``), reads the split sizes on the host (one synchronisation, as
  Megatron-Core's all-to-all dispatcher does), sends the rows to the experts' owners
  (``all_to_all_single`` with autograd), runs its local experts as grouped products and
  sends the results back; only the dense parameters' gradients are all-reduced.

Gradient synchronisation: ``bucketed`` (PyTorch DDP, 25 MB buckets overlapping the
backward; expert parameters excluded under ``ep``) or ``flat`` (one flattened all-reduce
after the backward). Precision recipes as in ``torch_train``: ``bf16`` and
``amp_fp32_master``. Each record (``dist_train_step``) holds the slowest rank's medians
of the forward, forward + backward (with DDP's overlapped all-reduce), the flat all-reduce,
the optimizer step and the whole step, and the largest peak memory of any rank.

    python3 -m moesim.calibrate.torch_train_dist --out dist.jsonl [--world 2] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moesim.calibrate.torch_train import BF16, Shape, Stack, _autocast, load_shape

PLAN: tuple[tuple[str, int, tuple[int, ...], tuple[str, ...]], ...] = (
    # model, layers, tokens per rank, precisions
    ("olmoe-1b-7b", 8, (4096, 8192, 16384), ("bf16", "amp_fp32_master")),
    ("mixtral-8x7b", 2, (4096, 8192, 16384), ("bf16", "amp_fp32_master")),
)
SEQ_LEN = 4096


class EPExperts(torch.nn.Module):
    """This rank's share of a layer's routed experts, exchanging rows with the others."""

    def __init__(
        self, s: Shape, dev: torch.device, dtype: torch.dtype, rank: int, world: int
    ) -> None:
        super().__init__()
        self.s, self.rank, self.world = s, rank, world
        self.local = s.experts // world
        n_up = (2 if s.gated else 1) * s.d_ff
        g = torch.Generator(device=dev).manual_seed(17)  # the router is replicated
        self.router = torch.nn.Parameter(
            torch.empty(s.experts, s.d_model, device=dev, dtype=dtype).normal_(0, 0.02, generator=g)
        )
        g.manual_seed(1000 + rank)  # each rank's own experts
        self.w_up = torch.nn.Parameter(
            torch.empty(self.local, n_up, s.d_model, device=dev, dtype=dtype).normal_(
                0, 0.02, generator=g
            )
        )
        self.w_down = torch.nn.Parameter(
            torch.empty(self.local, s.d_model, s.d_ff, device=dev, dtype=dtype).normal_(
                0, 0.02, generator=g
            )
        )
        self.grouped = dev.type == "cuda"

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.s.gated:
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        return F.relu(h)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        cast = self.w_up.dtype != BF16 and torch.is_autocast_enabled(x_in.device.type)
        x = x_in.to(BF16) if cast else x_in
        w_up = self.w_up.to(BF16) if cast else self.w_up
        w_down = self.w_down.to(BF16) if cast else self.w_down
        s, world, local = self.s, self.world, self.local
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        w, ids = torch.topk(probs, s.top_k, dim=-1)
        if s.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_idx = order // s.top_k
        rows = x.index_select(0, token_idx)
        counts_out = torch.bincount(flat, minlength=s.experts).view(world, local)
        counts_in = torch.empty_like(counts_out)
        dist.all_to_all_single(counts_in, counts_out)
        sizes = torch.cat([counts_out.sum(1), counts_in.sum(1), counts_in.sum(0)]).tolist()
        send, recv, per_local = sizes[:world], sizes[world : 2 * world], sizes[2 * world :]
        inbox = all_to_all_single(rows.new_empty((sum(recv), s.d_model)), rows, recv, send)
        expert_of = torch.arange(local, device=x.device).repeat(world)
        expert_of = expert_of.repeat_interleave(counts_in.reshape(-1))
        by_expert = torch.argsort(expert_of, stable=True)
        grouped = inbox.index_select(0, by_expert)
        if self.grouped:
            offs = torch.tensor(per_local, device=x.device).cumsum(0).to(torch.int32)
            h = torch._grouped_mm(grouped, w_up.transpose(-2, -1), offs=offs)
            out = torch._grouped_mm(self._act(h), w_down.transpose(-2, -1), offs=offs)
        else:  # CPU dry run: a loop over the local experts
            parts = torch.split(grouped, per_local)
            out = torch.cat(
                [self._act(p @ w_up[e].t()) @ w_down[e].t() for e, p in enumerate(parts)]
            )
        back_in = torch.zeros_like(inbox).index_copy(0, by_expert, out)
        back = all_to_all_single(rows.new_empty(rows.shape), back_in, send, recv)
        ws = w.reshape(-1).index_select(0, order).to(back.dtype).unsqueeze(-1)
        y = torch.zeros_like(x).index_add(0, token_idx, back * ws)
        return y.to(x_in.dtype)


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port)
    if args.cpu:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank)
        )
        dev = torch.device("cuda", rank)
    deadline = time.perf_counter() + args.budget_s
    records: list[dict[str, Any]] = []
    for name, *_ in PLAN:  # the expert-parallel layer computes the single-device layer
        shape = load_shape(name, 1)
        shape = replace(shape.tiny(), experts=4 * world) if args.cpu else shape
        rec = check_ep(dev, rank, world, shape)
        if rank == 0:
            records.append(rec)
            print(json.dumps(rec), flush=True)
    for name, layers, counts, precisions in PLAN:
        shape = load_shape(name, layers)
        seq = SEQ_LEN
        if args.cpu:
            shape, seq, counts = replace(shape.tiny(), layers=2, experts=4, top_k=2), 32, (64,)
        for precision in precisions:
            for layout in ("dp", "ep"):
                for sync in ("bucketed", "flat"):
                    for tokens in counts:
                        if time.perf_counter() > deadline:
                            break
                        step = _measure(
                            dev, rank, world, shape, precision, layout, sync, tokens, seq, args
                        )
                        if rank == 0 and step is not None:
                            records.append(step)
                            print(json.dumps(step), flush=True)
    if rank == 0:
        with open(args.out, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def check_ep(dev: torch.device, rank: int, world: int, shape: Shape) -> dict[str, Any]:
    """Relative error of the expert-parallel layer against one device holding every expert
    (the ranks' experts gathered), on the same tokens."""
    from moesim.calibrate.torch_train import Experts

    dtype = torch.float32 if dev.type == "cpu" else BF16
    ep = EPExperts(shape, dev, dtype, rank, world)
    g = torch.Generator(device=dev).manual_seed(5)
    x = torch.randn(256, shape.d_model, device=dev, generator=g).to(dtype)
    with torch.no_grad():
        y = ep(x).double()
        ups = [torch.empty_like(ep.w_up) for _ in range(world)]
        downs = [torch.empty_like(ep.w_down) for _ in range(world)]
        dist.all_gather(ups, ep.w_up.data.contiguous())
        dist.all_gather(downs, ep.w_down.data.contiguous())
        ref_layer = Experts(shape, dev, dtype)
        ref_layer.router.copy_(ep.router)
        ref_layer.w_up.copy_(torch.cat(ups))
        ref_layer.w_down.copy_(torch.cat(downs))
        ref_layer.form = "loop"
        ref = ref_layer(x).double()
    err = float((y - ref).norm() / ref.norm())
    worst = torch.tensor([err], device=dev)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {
        "kind": "check",
        "model": shape.name,
        "world": world,
        "rel_err_ep_vs_single": float(worst.item()),
        "tol": tol,
        "ok": float(worst.item()) < tol,
    }


def _measure(
    dev: torch.device,
    rank: int,
    world: int,
    shape: Shape,
    precision: str,
    layout: str,
    sync: str,
    tokens: int,
    seq: int,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    cuda = dev.type == "cuda"
    dtype = BF16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)  # dense weights alike on every rank
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    factory = None
    if layout == "ep":

        def factory(s: Shape, d: torch.device, t: torch.dtype) -> torch.nn.Module:
            return EPExperts(s, d, t, rank, world)

    try:
        model = Stack(shape, dev, dtype, factory)
        if layout == "dp" and not cuda:
            model.set_form("loop")
        expert_names = [n for n, _ in model.named_parameters() if ".experts.w_" in n]
        reduced = [
            p for n, p in model.named_parameters() if layout == "dp" or n not in expert_names
        ]
        net: torch.nn.Module = model
        if sync == "bucketed":
            if layout == "ep":
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, expert_names
                )
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rank] if cuda else None, bucket_cap_mb=25
            )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        gen = torch.Generator(device=dev).manual_seed(100 + rank)
        ids = torch.randint(0, shape.vocab, (tokens,), device=dev, generator=gen)
        tgt = torch.randint(0, shape.vocab, (tokens,), device=dev, generator=gen)
        seqs = max(1, tokens // seq)

        def fwd() -> torch.Tensor:
            with _autocast(dev, precision):
                return net(ids, tgt, seqs)

        def flat_sync() -> None:
            if sync != "flat":
                return
            grads = [p.grad for p in reduced if p.grad is not None]
            buf = _flatten_dense_tensors(grads)
            dist.all_reduce(buf)
            for g, r in zip(grads, _unflatten_dense_tensors(buf, grads), strict=True):
                g.copy_(r)

        def zero() -> None:
            opt.zero_grad(set_to_none=True)

        def fwd_bwd() -> None:
            fwd().backward()

        def step() -> None:
            zero()
            fwd_bwd()
            flat_sync()
            opt.step()

        for _ in range(2):
            step()
        t_fwd = _time(cuda, lambda: fwd().detach(), args.reps)
        zero()
        t_fb = _time(cuda, fwd_bwd, args.reps, zero)
        t_sync = _time(cuda, flat_sync, args.reps) if sync == "flat" else 0.0
        t_opt = _time(cuda, opt.step, args.reps)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t_step = _time(cuda, step, args.reps)
        peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else 0
        n_params = sum(p.numel() for p in model.parameters())
        oom = 0
    except torch.OutOfMemoryError:
        t_fwd = t_fb = t_sync = t_opt = t_step = float("nan")
        peak, oom, n_params = 0, 1, 0
    flag = torch.tensor([oom], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    vals = torch.tensor([t_fwd, t_fb, t_sync, t_opt, t_step, float(peak)], device=dev)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    f, fb, sy, op, st, pk = (float(v) for v in vals.tolist())
    if flag.item():
        return {
            "kind": "skipped",
            "model": shape.name,
            "layout": layout,
            "sync": sync,
            "precision": precision,
            "tokens_per_rank": tokens,
            "reason": "out of memory",
        }
    return {
        "kind": "dist_train_step",
        "world": world,
        "model": shape.name,
        "layers": shape.layers,
        "precision": precision,
        "layout": layout,
        "grad_sync": sync,
        "bucket_mb": 25 if sync == "bucketed" else None,
        "tokens_per_rank": tokens,
        "seq_len": seq,
        "sequences": max(1, tokens // seq),
        "params_per_rank": n_params,
        "fwd_ms": f,
        "fwd_bwd_ms": fb,
        "sync_ms": sy,
        "opt_ms": op,
        "step_ms": st,
        "peak_bytes": int(pk),
    }


def _time(cuda: bool, fn: Any, reps: int, between: Any = None) -> float:
    times = []
    for _ in range(reps):
        if between:
            between()
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=0, help="GPUs (default: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--cpu", action="store_true", help="dry run on the host (gloo), no timing")
    args = ap.parse_args(argv)
    world = args.world or (2 if args.cpu else torch.cuda.device_count())
    if world < 2:
        print("torch_train_dist: needs >= 2 GPUs (or --cpu)", file=sys.stderr)
        return 2
    env = {
        "kind": "env",
        "name": "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(0),
        "world": world,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": "" if args.cpu else ".".join(map(str, torch.cuda.nccl.version())),
        "date": datetime.now(UTC).date().isoformat(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(env) + "\n")
    mp.spawn(_worker, args=(world, args), nprocs=world)
    print(f"training steps on {world} GPUs written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
