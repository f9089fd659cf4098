"""Count the kernels of the measured MoE layer (``moesim.calibrate.torch_moe.MoELayer``)
stage by stage with ``torch.profiler``: the kernel counts of moesim's launch pipeline
(:class:`moesim.config.profile.LaunchFit`) come from here. Run on a GPU machine::

    python3 -m moesim.calibrate.torch_kernels --out kernels.jsonl [--models a,b] [--tokens 1,64]

One ``env`` record, then one ``kernel_count`` record per model and token count: the
number of device activities (kernels, device copies and fills) of each stage run alone
(router, permute, experts_grouped, experts_loop, combine, shared; forward_grouped and
forward_loop for the whole layer), the touched experts, and the activity names of the
grouped stages. Uniform routing; bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from moesim.calibrate.torch_moe import MoELayer, load_models

MODELS = ("olmoe-1b-7b", "switch-base-128", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b")
NAMED = ("router", "permute", "experts_grouped", "combine", "shared")


def device_activities(fn: Callable[[], Any]) -> list[str]:
    """Names of the device activities of one call of ``fn`` (after three warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def count_layer(layer: MoELayer, tokens: int) -> dict[str, Any]:
    x = layer.inputs(tokens, 1)
    bias = layer.routing_bias(tokens, "uniform", 1)
    w, ids = layer.router(x, bias)
    perm = layer.permute(x, ids, pad=True)
    ys = layer.experts(perm, "grouped_mm")
    stages: dict[str, Callable[[], Any]] = {
        "router": lambda: layer.router(x, bias),
        "permute": lambda: layer.permute(x, ids, pad=True),
        "experts_grouped": lambda: layer.experts(perm, "grouped_mm"),
        "experts_loop": lambda: layer.experts(layer.permute(x, ids), "loop"),
        "combine": lambda: layer.combine(ys, w, perm, tokens),
        "shared": lambda: layer.shared(x),
        "forward_grouped": lambda: layer.forward(x, bias, "grouped_mm"),
        "forward_loop": lambda: layer.forward(x, bias, "loop"),
    }
    rec: dict[str, Any] = {"kind": "kernel_count", "model": layer.spec.name, "tokens": tokens}
    rec["touched"] = int((torch.bincount(ids.reshape(-1), minlength=layer.spec.experts) > 0).sum())
    for name, fn in stages.items():
        names = device_activities(fn)
        rec[name] = len(names)
        if name in NAMED:
            rec[f"{name}_names"] = names
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1,4,64,1024")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    specs = load_models()
    with open(args.out, "w", encoding="utf-8") as out:
        env = {
            "kind": "env",
            "name": torch.cuda.get_device_name(dev),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.now(UTC).date().isoformat(),
            "argv": list(argv if argv is not None else sys.argv[1:]),
        }
        out.write(json.dumps(env) + "\n")
        for model in args.models.split(","):
            layer = MoELayer(specs[model], dev, torch.bfloat16, seed=0)
            for tokens in (int(t) for t in args.tokens.split(",")):
                rec = count_layer(layer, tokens)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                counts = {k: v for k, v in rec.items() if isinstance(v, int)}
                print(model, counts, flush=True)
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
