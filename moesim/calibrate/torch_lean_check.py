"""Is the lean engine right on the GPU? Its cached decode against a full recomputation, in
float32 and bfloat16, layer by layer.

``torch_lean_engine``'s own self-check failed on an H200 in bfloat16 (greedy agreement 2 of
8 tokens, relative logit error 0.37) while the CPU passed in float32 and bfloat16. Two
explanations predict different things:

- **a GPU-only fault** (a kernel, the cache indexing, the graphs): the cached decode
  departs from the recomputation in float32 as well, and in bfloat16 its hidden states
  are wrong already before any layer routes a token differently;
- **bfloat16 rounding flipping top-2 expert choices**: in float32 the two agree to
  rounding (and route alike); in bfloat16 they agree to bfloat16 rounding (~1e-2) up to
  the first layer where a token's top-2 experts differ, the flips fall where the
  reference's 2nd and 3rd router probabilities are close, and past a flip the error jumps
  (a whole expert's output replaced).

Per variant (dtype x layers x width x expert kernel) this writes one ``check`` record:
the engine's own self-check (greedy tokens served through the engine, graphs included,
against the recomputation; one eager cached decode step's logits), the tokens served with
and without graphs, and per layer the hidden state's relative error and whether the top-2
experts agree, for the decode step and for every prompt position of the prefill. Imports
only the standard library and torch:

    python3 -m moesim.calibrate.torch_lean_check --out check.jsonl [--cpu]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time
import traceback
from typing import Any

from moesim.calibrate.torch_lean_engine import (
    QUICK_CONFIG,
    LeanConfig,
    LeanEngine,
    Mixtral,
    Req,
    self_check,
)
from moesim.calibrate.torch_serving import MIXTRAL_8X7B, Sink, _smi, log

NARROW = {
    **MIXTRAL_8X7B,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
"""Mixtral's depth, experts and head size at a quarter of its width (float32 fits)."""

GPU_VARIANTS = (
    # name, dtype, layers, width, expert kernel
    ("fp32-8l-full-loop", "float32", 8, "full", "loop"),
    ("fp32-8l-full-grouped", "float32", 8, "full", "grouped"),
    ("bf16-8l-full-grouped", "bfloat16", 8, "full", "grouped"),
    ("bf16-32l-full-grouped", "bfloat16", 32, "full", "grouped"),
    ("bf16-32l-full-loop", "bfloat16", 32, "full", "loop"),
    ("fp32-32l-narrow-loop", "float32", 32, "narrow", "loop"),
    ("bf16-32l-narrow-grouped", "bfloat16", 32, "narrow", "grouped"),
)
"""Float32 (does the engine compute the right function on the GPU?), bfloat16 at 8 and 32
layers, both expert kernels, full and narrow width; the served one is bf16-32l-full-grouped."""

CPU_VARIANTS = (
    ("fp32-2l-quick-loop", "float32", 2, "quick", "loop"),
    ("bf16-2l-quick-loop", "bfloat16", 2, "quick", "loop"),
)


def _config(width: str, layers: int) -> dict[str, Any]:
    base = {"full": MIXTRAL_8X7B, "narrow": NARROW, "quick": QUICK_CONFIG}[width]
    return {**base, "num_hidden_layers": layers}


def _served(engine: LeanEngine, prompt: list[int], graphs: bool) -> list[int]:
    """Greedy tokens of one request served through the engine, with or without graphs."""
    saved = engine.graphs
    if not graphs:
        engine.graphs = None
    try:
        req = Req("check", prompt, 8, 0.0)
        engine.waiting.append(req)
        while engine.waiting or engine.running:
            engine.step()
    finally:
        engine.graphs = saved
    return list(req.out)


def _compare(torch: Any, got: Any, ref: Any, topk: int) -> dict[str, Any]:
    """Layer by layer, rows of one trace against the same rows of another: the hidden
    state's relative error per layer (median over rows), the share of rows whose top-k
    experts differ, each row's first such layer, the largest error before it, and the
    reference's relative gap between its k-th and (k+1)-th router probability where a
    row's experts first differ (against that gap's median over all rows and layers)."""
    layers = len(ref)
    rows = ref[0][0].shape[0]
    err = torch.stack(
        [(g[0] - r[0]).norm(dim=-1) / r[0].norm(dim=-1).clamp_min(1e-30) for g, r in zip(got, ref)]
    )  # [layers, rows]
    same = torch.stack(
        [
            (g[2][:, :topk].sort(-1).values == r[2][:, :topk].sort(-1).values).all(-1)
            for g, r in zip(got, ref)
        ]
    )  # [layers, rows]
    gap = torch.stack([(r[1][:, topk - 1] - r[1][:, topk]) / r[1][:, topk - 1] for r in ref])
    first, before, flip_gaps = [], [], []
    for row in range(rows):
        diff = (~same[:, row]).nonzero()
        f = int(diff[0]) if len(diff) else layers
        first.append(f)
        before.append(float(err[:f, row].max()) if f else 0.0)
        if f < layers:
            flip_gaps.append(float(gap[f, row]))
    flipped = [f for f in first if f < layers]
    return {
        "rows": rows,
        "layer_rel_err_median": [round(float(e), 6) for e in err.median(dim=1).values],
        "layer_flip_share": [round(float(x), 4) for x in (~same).float().mean(dim=1)],
        "rows_flipped": len(flipped),
        "first_flip_layer_median": sorted(flipped)[len(flipped) // 2] if flipped else None,
        "max_err_before_first_flip": round(max(before), 6),
        "final_rel_err_median": round(float(err[-1].median()), 6),
        "gap_at_first_flip_median": round(sorted(flip_gaps)[len(flip_gaps) // 2], 5)
        if flip_gaps
        else None,
        "gap_median": round(float(gap.median()), 5),
    }


def layer_check(model: Mixtral, prompt: list[int], first: int) -> dict[str, Any]:
    """The prefill of ``prompt`` (in slot 0) and the cached decode of ``first`` after it,
    against one recomputation of ``prompt + [first]`` without the cache, layer by layer."""
    torch = model.torch
    dev = model.device
    n = len(prompt)
    fed = torch.tensor([*prompt, first], device=dev)
    model.trace = []
    model.forward(fed, torch.arange(n + 1, device=dev), 0, 0, [(model.lean.max_seqs - 1, 0, n + 1)],
                  torch.tensor([n], device=dev))  # fmt: skip
    ref = model.trace
    model.trace = []
    model.forward(fed[:n], torch.arange(n, device=dev), 0, 0, [(0, 0, n)],
                  torch.tensor([n - 1], device=dev))  # fmt: skip
    pre = model.trace
    model.trace = []
    model.forward(fed[n:], torch.tensor([n], device=dev), 1, n + 1, [],
                  torch.tensor([0], device=dev))  # fmt: skip
    dec = model.trace
    model.trace = None
    k = model.topk
    return {
        "prefill": _compare(torch, pre, [(x[:n], p[:n], i[:n]) for x, p, i in ref], k),
        "decode": _compare(torch, dec, [(x[n:], p[n:], i[n:]) for x, p, i in ref], k),
    }


def check_variant(
    torch: Any, device: Any, variant: tuple[str, str, int, str, str]
) -> dict[str, Any]:
    name, dtype_name, layers, width, kernel = variant
    cfg = _config(width, layers)
    dtype = getattr(torch, dtype_name)
    use_graphs = device.type == "cuda" and kernel == "grouped"  # the loop syncs: no capture
    lean = LeanConfig(
        max_seqs=4,
        max_len=128,
        batch_buckets=(1, 2, 4),
        context_buckets=(64, 128),
        graphs=use_graphs,
    )
    t = time.perf_counter()
    model = Mixtral(cfg, lean, device, dtype)
    if kernel == "loop":
        model.grouped_mm = None
        model.expert_path = "loop"
    elif model.grouped_mm is None:
        raise RuntimeError("grouped_mm is not available on this device")
    engine = LeanEngine(model)
    rng = random.Random(1)
    vocab = int(cfg["vocab_size"])
    out: dict[str, Any] = {"variant": name, "dtype": dtype_name, "layers": layers,
                           "width": width, "expert_kernel": model.expert_path,
                           "graphs": use_graphs}  # fmt: skip
    for i in range(2):
        prompt = [rng.randrange(3, vocab) for _ in range(37)]
        served = _served(engine, prompt, graphs=True)
        eager = _served(engine, prompt, graphs=False)
        rec = self_check(model, engine, rng, vocab)
        out[f"prompt{i}"] = {
            "self_check": rec,
            "graph_tokens_equal_eager": served == eager,
            "layers": layer_check(model, prompt, served[0]),
        }
    out["seconds"] = round(time.perf_counter() - t, 2)
    del engine, model
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines, written as measured")
    ap.add_argument("--cpu", action="store_true", help="the CPU (small variants only)")
    ap.add_argument("--only", default="", help="comma list of variant names (default: all)")
    args = ap.parse_args(argv)
    import torch

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    # float32 means float32: no TF32 in matrix products or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    variants: tuple[tuple[str, str, int, str, str], ...] = (
        GPU_VARIANTS if use_cuda else CPU_VARIANTS
    )
    if args.only:
        wanted = set(args.only.split(","))
        variants = tuple(v for v in variants if v[0] in wanted)
    failed = 0
    with open(args.out, "w", encoding="utf-8") as fh, torch.inference_mode():
        sink = Sink(fh)
        sink.write(
            "env",
            engine="lean-torch check",
            torch=torch.__version__,
            cuda=torch.version.cuda,
            python=platform.python_version(),
            gpu=torch.cuda.get_device_name(0) if use_cuda else "cpu",
            smi=_smi() if use_cuda else "none",
            allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
            variants=[v[0] for v in variants],
            utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        for variant in variants:
            try:
                rec = check_variant(torch, device, variant)
                sink.write("check", **rec)
                p = rec["prompt0"]
                log(
                    f"{variant[0]}: agreement {p['self_check']['greedy_agreement']:.2f}, "
                    f"logit err {p['self_check']['decode_rel_err']:.2e}, graphs=eager "
                    f"{p['graph_tokens_equal_eager']}, prefill rows flipped "
                    f"{p['layers']['prefill']['rows_flipped']}/{p['layers']['prefill']['rows']}"
                    f" (first at layer {p['layers']['prefill']['first_flip_layer_median']}), "
                    f"err before a flip {p['layers']['prefill']['max_err_before_first_flip']:.1e}; "
                    f"decode layer errs {p['layers']['decode']['layer_rel_err_median'][:4]}.."
                    f"{p['layers']['decode']['final_rel_err_median']}"
                )
            except Exception as exc:
                failed += 1
                sink.write("error", variant=variant[0], error=repr(exc),
                           trace=traceback.format_exc()[-2000:])  # fmt: skip
                log(f"{variant[0]}: {exc!r}")
            gc.collect()
            if use_cuda:
                torch.cuda.empty_cache()
        sink.write("done", failed=failed)
    return 0 if failed < len(variants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
