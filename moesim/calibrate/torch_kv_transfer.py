# ruff: noqa: B023  (the timed closures run inside the iteration that defines them)
"""KV-cache block transfers between two GPUs of one host, measured (issue #17: the KV
transfer of prefill/decode disaggregation, priced by ``moesim.engine.kv_transfer``).

A prefilled request's KV cache is a set of paged blocks (``block_tokens`` tokens x layers
x KV bytes per token per layer) scattered in the prefill GPU's cache; disaggregated
serving sends them to the decode GPU. Measured, for a model's KV shape over block sizes
and request lengths:

- ``p2p``: one copy per block straight from GPU 0's cache to GPU 1's (NVLink / PCIe
  peer-to-peer, ``Tensor.copy_`` across devices);
- ``p2p_batched``: the request's blocks gathered into one contiguous buffer on GPU 0, one
  copy, scattered into GPU 1's cache (what transfer engines do to avoid per-block calls);
- ``host``: through pinned host memory (GPU 0 -> host -> GPU 1), for hosts without
  peer access.

Times are medians of host-clock measurements around synchronised copies, in ms. Imports
only torch and the standard library.

    python3 -m moesim.calibrate.torch_kv_transfer --out kv.jsonl [--cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import torch

# KV bytes per token per layer, bf16: Mixtral-8x7B (GQA, 8 KV heads x 128, K and V) and
# DeepSeek-V3 (MLA: compressed latent 512 + rope key 64), from the catalog's model shapes
SHAPES = {
    "mixtral-8x7b": {"layers": 32, "kv_bytes_per_token_per_layer": 2 * 8 * 128 * 2},
    "deepseek-v3": {"layers": 61, "kv_bytes_per_token_per_layer": (512 + 64) * 2},
}
BLOCK_TOKENS = (16, 64, 256)
REQUEST_TOKENS = (512, 2048, 8192)


def _sync(devs: Sequence[torch.device]) -> None:
    for d in devs:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _median_ms(fn: Any, devs: Sequence[torch.device], reps: int) -> float:
    for _ in range(2):
        fn()
    _sync(devs)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(devs)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(src: torch.device, dst: torch.device, reps: int, quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for model, shape in SHAPES.items():
        per_token = shape["layers"] * shape["kv_bytes_per_token_per_layer"]
        for block in BLOCK_TOKENS[:1] if quick else BLOCK_TOKENS:
            for tokens in REQUEST_TOKENS[:1] if quick else REQUEST_TOKENS:
                blocks = -(-tokens // block)
                block_bytes = block * per_token
                cache_blocks = 4 * blocks  # the request's blocks sit among others'
                elems = block_bytes // 2
                cache_src = torch.randn(cache_blocks, elems, device=src).to(torch.bfloat16)
                cache_dst = torch.zeros(cache_blocks, elems, device=dst, dtype=torch.bfloat16)
                g = torch.Generator().manual_seed(tokens + block)
                ids_src = torch.randperm(cache_blocks, generator=g)[:blocks]
                ids_dst = torch.randperm(cache_blocks, generator=g)[:blocks]
                ids_src_d, ids_dst_d = ids_src.to(src), ids_dst.to(dst)
                host = torch.empty(
                    blocks, elems, dtype=torch.bfloat16, pin_memory=src.type == "cuda"
                )

                def p2p() -> None:
                    for a, b in zip(ids_src.tolist(), ids_dst.tolist(), strict=True):
                        cache_dst[b].copy_(cache_src[a], non_blocking=True)

                def p2p_batched() -> None:
                    packed = cache_src.index_select(0, ids_src_d)
                    cache_dst.index_copy_(0, ids_dst_d, packed.to(dst, non_blocking=True))

                def via_host() -> None:
                    host.copy_(cache_src.index_select(0, ids_src_d), non_blocking=True)
                    _sync([src])
                    cache_dst.index_copy_(0, ids_dst_d, host.to(dst, non_blocking=True))

                p2p_batched()
                _sync([src, dst])
                ok = bool(
                    torch.equal(
                        cache_dst.index_select(0, ids_dst_d).cpu(),
                        cache_src.index_select(0, ids_src_d).cpu(),
                    )
                )
                for mode, fn in (("p2p", p2p), ("p2p_batched", p2p_batched), ("host", via_host)):
                    ms = _median_ms(fn, [src, dst], reps)
                    nbytes = blocks * block_bytes
                    out.append(
                        {
                            "kind": "kv_transfer",
                            "model": model,
                            "mode": mode,
                            "block_tokens": block,
                            "request_tokens": tokens,
                            "blocks": blocks,
                            "bytes": nbytes,
                            "ms": ms,
                            "gbps": nbytes / ms / 1e6,
                            "checked": ok,
                        }
                    )
                    print(
                        f"{model:13s} {mode:11s} block {block:4d} tokens {tokens:5d}: "
                        f"{ms:8.3f} ms  {nbytes / ms / 1e6:7.1f} GB/s",
                        flush=True,
                    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="dry run on the host (no timing)")
    args = ap.parse_args(argv)
    if args.cpu:
        src = dst = torch.device("cpu")
    elif torch.cuda.device_count() < 2:
        print("torch_kv_transfer: needs 2 GPUs (or --cpu)", file=sys.stderr)
        return 2
    else:
        src, dst = torch.device("cuda", 0), torch.device("cuda", 1)
    env = {
        "kind": "env",
        "name": "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peer_access": (not args.cpu) and torch.cuda.can_device_access_peer(0, 1),
        "date": datetime.now(UTC).date().isoformat(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }
    records = [env, *measure(src, dst, 1 if args.cpu else args.reps, args.cpu)]
    with open(args.out, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    if not all(r.get("checked", True) for r in records):
        print("torch_kv_transfer: a transferred block differs from its source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
