"""An expert-parallel MoE layer on the GPUs of one host, measured end to end.

One process per GPU (PyTorch + NCCL), each holding ``experts / world`` experts of a gated
FFN (``silu(x W1) * (x W3) W2``, bf16) and ``tokens`` tokens of its own. One layer:

1. router: ``x @ Wg`` over all experts, top-k (softmax weights); the (token, choice)
   rows sorted by expert;
2. dispatch: the per-expert row counts are exchanged (one ``all_to_all_single``), the
   split sizes read on the host (one synchronisation, as Megatron-Core's all-to-all token
   dispatcher does), and the rows sent to the ranks owning their experts;
3. experts: received rows regrouped by expert, each local expert runs on its contiguous
   rows (one product chain per expert: moesim's ``expert_kernel: loop``);
4. combine: rows go back (``all_to_all_single``) and are summed into their tokens with
   the router weights.

Per token count it records the slowest rank's median time per layer (host clock around a
synchronized call after a barrier, after warm-up), and the experts' row counts, so
moesim's ``layer`` workload on the same shape can be compared (docs/fidelity.md). Imports
only the standard library and torch; NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

    python3 -m moesim.calibrate.torch_ep --out ep.jsonl [--world 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

TOKENS = (16, 64, 256, 1024, 4096, 16384)  # --max-tokens (default 4096) caps them


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port)
    if args.cpu:  # a dry run of the logic (gloo on the host), not a measurement
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world)
        dev = torch.device("cuda", rank)

    def sync() -> None:
        if not args.cpu:
            torch.cuda.synchronize()

    bf16 = torch.bfloat16
    d, f, n_exp, k = args.d_model, args.d_ff, args.experts, args.top_k
    local = n_exp // world
    gen = torch.Generator(device=dev).manual_seed(1000 + rank)

    def rand(*shape: int) -> Any:
        return (torch.randn(*shape, device=dev, generator=gen) * 0.02).to(bf16)

    wg = rand(d, n_exp)
    experts = [(rand(d, f), rand(d, f), rand(f, d)) for _ in range(local)]

    def layer(x: Any) -> tuple[Any, Any]:
        logits = (x @ wg).float()
        weights, chosen = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = x.index_select(0, order // k)  # (token, choice) rows sorted by expert
        counts_out = torch.bincount(flat, minlength=n_exp).view(world, local)
        counts_in = torch.empty_like(counts_out)
        dist.all_to_all_single(counts_in, counts_out)  # rows per (source, local expert)
        # one host synchronisation for every split size (as Megatron's a2a dispatcher)
        sizes = torch.cat([counts_out.sum(1), counts_in.sum(1), counts_in.sum(0)]).tolist()
        send_l, recv_l, per_local = sizes[:world], sizes[world : 2 * world], sizes[2 * world :]
        inbox = torch.empty(sum(recv_l), d, device=dev, dtype=bf16)
        dist.all_to_all_single(inbox, rows, recv_l, send_l)
        # received rows are grouped by source, then expert: regroup them by expert
        expert_of = (
            torch.arange(local, device=dev).repeat(world).repeat_interleave(counts_in.reshape(-1))
        )
        by_expert = torch.argsort(expert_of, stable=True)
        grouped = inbox.index_select(0, by_expert)
        outs = []
        for h, (w1, w3, w2) in zip(torch.split(grouped, per_local), experts):
            outs.append((torch.nn.functional.silu(h @ w1) * (h @ w3)) @ w2)
        out = torch.empty_like(inbox)
        out.index_copy_(0, by_expert, torch.cat(outs))
        back = torch.empty_like(rows)
        dist.all_to_all_single(back, out, send_l, recv_l)
        combined = torch.zeros_like(x)
        w = weights.reshape(-1)[order].to(bf16).unsqueeze(1)
        combined.index_add_(0, order // k, back * w)
        return combined, counts_in.sum(dim=0)

    records: list[dict[str, Any]] = []
    for tokens in TOKENS:
        if tokens > args.max_tokens:
            continue
        x = rand(tokens, d)
        for _ in range(3):
            y, rows_per_expert = layer(x)
        sync()
        if args.check:  # the layer against a dense single-process computation
            _check(x, y, wg, experts, rank, world, local, k, dist, torch)
        times = []
        for _ in range(args.reps):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            _, rows_per_expert = layer(x)
            sync()
            times.append(time.perf_counter() - t0)
        med = torch.tensor([statistics.median(times)], device=dev)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        loads = [torch.zeros_like(rows_per_expert) for _ in range(world)]
        dist.all_gather(loads, rows_per_expert)
        records.append(
            {
                "kind": "ep_layer",
                "world": world,
                "tokens_per_rank": tokens,
                "experts": n_exp,
                "top_k": k,
                "d_model": d,
                "d_ff": f,
                "ms": float(med.item()) * 1e3,
                "rows_per_expert": [int(v) for t in loads for v in t.tolist()],
            }
        )
    if rank == 0:
        with open(args.out, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def _check(
    x: Any,
    y: Any,
    wg: Any,
    experts: Any,
    rank: int,
    world: int,
    local: int,
    k: int,
    dist: Any,
    torch: Any,
) -> None:
    """Every rank's output equals the dense computation with all experts (gathered)."""
    mats = []
    for w in experts:
        for m in w:
            mats.append(m.contiguous())
    gathered = []
    for m in mats:
        parts = [torch.empty_like(m) for _ in range(world)]
        dist.all_gather(parts, m)
        gathered.append(parts)
    n_local = len(experts)
    all_experts = [
        tuple(gathered[e * 3 + j][r] for j in range(3))
        for r in range(world)
        for e in range(n_local)
    ]
    probs = torch.softmax((x @ wg).float(), dim=-1)
    weights, chosen = torch.topk(probs, k, dim=-1)
    ref = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(k):
            w1, w3, w2 = all_experts[int(chosen[t, j])]
            h = x[t : t + 1]
            ref[t] += (
                float(weights[t, j])
                * ((torch.nn.functional.silu(h @ w1) * (h @ w3)) @ w2)[0].float()
            )
    err = float((y.float() - ref).abs().max() / (ref.abs().max() + 1e-12))
    if err > 0.05:
        raise AssertionError(f"rank {rank}: EP layer differs from the dense one by {err:.3g}")


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=0, help="GPUs (default: all)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--port", type=int, default=29541)
    ap.add_argument("--cpu", action="store_true", help="dry run on the host (gloo), no timing")
    ap.add_argument("--check", action="store_true", help="check outputs against a dense layer")
    args = ap.parse_args(argv)
    world = args.world or (2 if args.cpu else torch.cuda.device_count())
    if world < 2 or args.experts % world:
        print("torch_ep: needs >= 2 GPUs and experts divisible by them", file=sys.stderr)
        return 2
    env = {
        "kind": "env",
        "name": "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(0),
        "world": world,
        "torch": torch.__version__,
        "nccl": "" if args.cpu else ".".join(map(str, torch.cuda.nccl.version())),
        "date": datetime.now(UTC).date().isoformat(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(env) + "\n")
    mp.spawn(_worker, args=(world, args), nprocs=world)
    print(f"EP layers on {world} GPUs written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
