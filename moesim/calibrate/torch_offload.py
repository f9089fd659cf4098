"""Measure expert offloading on one GPU, for checking moesim's offload model.

Three measurements, written as JSONL records:

- ``copy``: host-to-device copies of one expert's weights (gated FFN: 3 x d_model x d_ff
  bf16 elements), from pinned and from pageable host memory;
- ``expert``: one expert's forward (``silu(x W1) * (x W3) W2``) over ``tokens`` tokens,
  weights resident in HBM;
- ``layer``: a MoE layer on one device that uses ``experts`` experts, ``misses`` of them
  not resident: the misses are copied from pinned host memory one after another on a
  copy stream while the compute stream runs the resident experts, then each missing
  expert as soon as its copy lands (the rule of :mod:`moesim.cost.offload` with
  ``overlap``).

Times are CUDA-event times, median over ``--reps`` after a warm-up. Imports only torch,
numpy-free stdlib, so it runs on a bare GPU machine:

    python3 -m moesim.calibrate.torch_offload --out offload.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from typing import Any


def _smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--experts", type=int, default=8, help="experts the measured layer uses")
    args = ap.parse_args(argv)

    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    d, f = args.d_model, args.d_ff
    elems = 3 * d * f
    nbytes = 2 * elems
    meta: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "smi": _smi(),
        "torch": torch.__version__,
        "d_model": d,
        "d_ff": f,
        "expert_bytes": nbytes,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    records: list[dict[str, Any]] = []

    def timed(fn: Any, reps: int = args.reps) -> list[float]:
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        return out

    # --- copies ----------------------------------------------------------------------
    dst = torch.empty(elems, dtype=bf16, device=dev)
    for mem in ("pinned", "pageable"):
        src = torch.randn(elems, dtype=torch.float32).to(bf16)
        if mem == "pinned":
            src = src.pin_memory()
        ms = timed(lambda s=src: dst.copy_(s, non_blocking=True))
        records.append({"kind": "copy", "mem": mem, "bytes": nbytes, "ms": ms, **meta})
        del src

    # --- experts ---------------------------------------------------------------------
    def weights(device: Any, pin: bool = False) -> tuple[Any, Any, Any]:
        w = [
            (torch.randn(a, b, dtype=torch.float32) * 0.02).to(bf16)
            for a, b in ((d, f), (d, f), (f, d))
        ]
        if device == "cpu":
            return tuple(x.pin_memory() if pin else x for x in w)
        return tuple(x.to(device) for x in w)

    def ffn(x: Any, w: tuple[Any, Any, Any]) -> Any:
        return (torch.nn.functional.silu(x @ w[0]) * (x @ w[1])) @ w[2]

    resident = [weights(dev) for _ in range(args.experts)]
    token_sizes = (1, 8, 64, 512)
    for tokens in token_sizes:
        x = torch.randn(tokens, d, device=dev, dtype=bf16)
        ms = timed(lambda x=x: ffn(x, resident[0]))
        records.append({"kind": "expert", "tokens": tokens, "ms": ms, **meta})

    # --- a layer with misses ---------------------------------------------------------
    host = [weights("cpu", pin=True) for _ in range(args.experts)]
    landing = [tuple(torch.empty_like(t) for t in resident[0]) for _ in range(args.experts)]
    copy_stream = torch.cuda.Stream()
    for tokens in (1, 64):
        x = torch.randn(tokens, d, device=dev, dtype=bf16)
        for misses in sorted({0, 1, 2, 4, args.experts}):
            if misses > args.experts:
                continue

            def layer(x: Any = x, misses: int = misses) -> None:
                main_stream = torch.cuda.current_stream()
                copy_stream.wait_stream(main_stream)
                landed = []
                with torch.cuda.stream(copy_stream):
                    for i in range(misses):
                        for t_dst, t_src in zip(landing[i], host[i]):
                            t_dst.copy_(t_src, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(copy_stream)
                        landed.append(ev)
                for i in range(args.experts - misses):
                    ffn(x, resident[i])
                for i in range(misses):
                    main_stream.wait_event(landed[i])
                    ffn(x, landing[i])
                main_stream.wait_stream(copy_stream)

            ms = timed(layer)
            records.append(
                {
                    "kind": "layer",
                    "tokens": tokens,
                    "experts": args.experts,
                    "misses": misses,
                    "ms": ms,
                    **meta,
                }
            )
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in records:
            r["median_ms"] = statistics.median(r["ms"])
            fh.write(json.dumps(r) + "\n")
    for r in records:
        keys = {k: r[k] for k in ("kind", "mem", "tokens", "misses") if k in r}
        print(keys, f"{r['median_ms']:.4f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
