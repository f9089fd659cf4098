"""Collective measurements on the GPUs of one host with PyTorch + NCCL: all-to-all,
all-reduce and all-gather over message sizes, one process per GPU.

Run on a machine with several CUDA GPUs::

    python3 -m moesim.calibrate.torch_collectives --out collectives.jsonl

Records follow ``moesim/catalog/measurements/h200x2_collectives.jsonl``: per size, the
slowest rank's median time per call (host clock around a synchronized call, after warm-up),
in ms. ``moesim calibrate --collectives FILE`` fits them (alpha + bytes / bandwidth).
Imports only the standard library and torch, so it runs on bare GPU machines; NVLink
multicast stays off (NCCL_NVLS_ENABLE=0) as the shared machines require.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

SIZES = [1 << s for s in range(12, 31, 2)]  # 4 KiB .. 1 GiB per rank


def _worker(rank: int, world: int, out: str, sizes: list[int], reps: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    records: list[dict[str, Any]] = []

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        local = torch.tensor([statistics.median(times)], device=dev)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)  # the slowest rank's median
        return float(local.item()) * 1e3

    for size in sizes:
        n = size // 2  # bf16 elements
        x = torch.randn(n, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        ms = timed(lambda x=x, y=y: dist.all_to_all_single(y, x))
        records.append(
            {
                "kind": "all_to_all",
                "bytes_per_rank": size,
                "ms": ms,
                "algbw_gbps": size / ms / 1e6,
                "world": world,
            }
        )
        ms = timed(lambda x=x: dist.all_reduce(x))
        busbw = 2 * (world - 1) / world * size / ms / 1e6
        records.append(
            {
                "kind": "all_reduce",
                "bytes": size,
                "ms": ms,
                "algbw_gbps": size / ms / 1e6,
                "busbw_gbps": busbw,
                "world": world,
            }
        )
        g = torch.empty(n * world, device=dev, dtype=torch.bfloat16)
        ms = timed(lambda g=g, x=x: dist.all_gather_into_tensor(g, x))
        records.append({"kind": "all_gather", "bytes_per_rank": size, "ms": ms, "world": world})
        del x, y, g
        torch.cuda.empty_cache()
    if rank == 0:
        with open(out, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=0, help="GPUs to use (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-bytes", type=int, default=1 << 30)
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args(argv)
    world = args.world or torch.cuda.device_count()
    if world < 2:
        print("torch_collectives: needs at least 2 GPUs", file=sys.stderr)
        return 2
    try:
        smi = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        smi = None
    env = {
        "kind": "env",
        "name": torch.cuda.get_device_name(0),
        "world": world,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "smi": smi,
        "date": datetime.now(UTC).date().isoformat(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(env) + "\n")
    sizes = [s for s in SIZES if s <= args.max_bytes]
    mp.spawn(_worker, args=(world, args.out, sizes, args.reps, args.port), nprocs=world)
    print(f"collectives of {world} GPUs written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
