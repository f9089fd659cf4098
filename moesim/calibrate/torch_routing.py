"""Record routing traces: which experts every token chose at every MoE layer.

Two sources, both writing the trace format of ``docs/routing.md`` (``routing: {kind:
trace, path: ...}``, ``moesim routing stats``, ``moesim routing fit``):

- ``--source hf`` (default): a Hugging Face transformers MoE model built from its config
  with random weights (nothing is downloaded) on a GPU (``--cpu``: on the CPU). Shapes
  (:data:`SHAPES`, the widths of ``moesim/catalog/data/models.yaml``, mapped to the HF keys
  as ``moesim/loader/hf_model.py`` reads them back; ``tests/test_routing_capture.py``
  checks the two agree): ``mixtral-8x7b`` (MixtralConfig), ``olmoe-1b-7b`` (OlmoeConfig),
  ``qwen1.5-moe-a2.7b`` (Qwen2MoeConfig), ``deepseek-v2-lite`` (DeepseekV2Config), with
  ``--layers`` decoder layers (fewer than published is fine). A forward hook on every
  router module (transformers 5.x: ``*TopKRouter``/``*TopkRouter``, which return
  ``(logits, top-k weights, top-k indices)``) records the indices it returned, best first.
  Synthetic prompts: ``--prompts`` requests one after another (batch 1), each
  ``--prompt-tokens`` token ids drawn from a Zipf(1.1) law over the vocabulary (seeded),
  prefilled in one forward pass (the tokens of a prefill share a ``step``), then
  ``--decode-tokens`` decode steps with a KV cache, each feeding a token sampled from the
  model's own next-token distribution (temperature 1, seeded generator; greedy decoding
  of random weights loops on one token).
- ``--source reference``: moesim's numpy reference MoE layer (``moesim/reference``) on the
  CPU, ``--layers`` MoE layers of the shape's routing (experts, top-k, scoring, shared
  experts, groups) at shrunk widths (``--d-model``, ``--d-ff``), stacked with a residual
  and an RMS normalisation between layers (no attention), tokens embedded from a random
  table; decode tokens are further Zipf draws.

**Skew.** Random router weights route almost uniformly; trained routers are skewed (a few
experts win most tokens). ``--router-bias-std S`` adds a seeded per-expert bias
``S x N(0, 1)``, drawn independently for every MoE layer, to the router logits before the
top-k (the hook recomputes the router's own selection from the biased logits: softmax,
DeepSeek's group-limited greedy when configured, top-k, the model's renormalisation and
scaling). The trace's env record says so (``router_bias_std``, ``router_bias``): such a
trace is *synthetic skew on random weights*, not a trained model's routing.

Outputs: ``OUT.jsonl`` (one token a line: ``step``, ``experts``, ``weights``), ``OUT.npz``
(the same arrays) and ``OUT.env.json`` (the env record: source, shape, config, device,
torch/transformers versions, date, argv, bias, token counts). ``--decode-only`` also
writes ``OUT.decode.jsonl`` with only the decode tokens (the access sequence of a batch-1
offloaded decode). The GPU path imports only the standard library, torch, transformers
and numpy (a transformers dependency):

    python3 -m moesim.calibrate.torch_routing --shape mixtral-8x7b --layers 8 \\
        --router-bias-std 1.0 --out traces/mixtral-l8
    python3 -m moesim.calibrate.torch_routing --cpu --tiny --shape olmoe-1b-7b --out /tmp/t
    python3 -m moesim.calibrate.torch_routing --source reference --shape olmoe-1b-7b --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # moesim/catalog/data/models.yaml mixtral-8x7b (mistralai/Mixtral-8x7B-v0.1 config.json)
    "mixtral-8x7b": {
        "config": "MixtralConfig",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    },
    # olmoe-1b-7b (allenai/OLMoE-1B-7B-0924): norm_topk_prob false
    "olmoe-1b-7b": {
        "config": "OlmoeConfig",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "vocab_size": 50304,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
    },
    # qwen1.5-moe-a2.7b (Qwen/Qwen1.5-MoE-A2.7B): one gated shared expert of 5632
    "qwen1.5-moe-a2.7b": {
        "config": "Qwen2MoeConfig",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "vocab_size": 151936,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
    },
    # deepseek-v2-lite (deepseek-ai/DeepSeek-V2-Lite): MLA, first layer dense, greedy top-6
    "deepseek-v2-lite": {
        "config": "DeepseekV2Config",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "vocab_size": 102400,
        "tie_word_embeddings": False,
    },
}
"""HF config keys of each recorded shape (full published widths; ``--layers`` sets
``num_hidden_layers``)."""

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
}
"""``--tiny``: widths shrunk for a CPU dry run (experts, top-k and routing unchanged)."""


def hf_keys(shape: str, layers: int, tiny: bool = False) -> dict[str, Any]:
    """The HF config keyword arguments of ``shape`` with ``layers`` decoder layers."""
    keys = {k: v for k, v in SHAPES[shape].items() if k != "config"}
    keys["num_hidden_layers"] = layers
    if tiny:
        mha = keys.get("num_key_value_heads") == keys.get("num_attention_heads")
        for k, v in TINY.items():
            if k in keys:
                keys[k] = v
        if mha:
            keys["num_key_value_heads"] = keys["num_attention_heads"]
    return keys


def moe_layers(shape: str, layers: int) -> int:
    """MoE layers among ``layers`` decoder layers of ``shape``."""
    return max(0, layers - int(SHAPES[shape].get("first_k_dense_replace", 0)))


def zipf_ids(rng: random.Random, vocab: int, n: int, s: float = 1.1) -> list[int]:
    """``n`` token ids from a Zipf(s) law over ``vocab`` ids (a seeded, language-like
    frequency: id r has weight (r + 1)^-s, ids shuffled once so hot ids are spread)."""
    weights = [(r + 1) ** -s for r in range(vocab)]
    perm = list(range(vocab))
    random.Random(rng.random()).shuffle(perm)
    return [perm[i] for i in rng.choices(range(vocab), weights=weights, k=n)]


@dataclass
class Trace:
    """A recorded trace: per token its step, phase and per-layer choices (best first)."""

    experts: list[list[list[int]]] = field(default_factory=list)
    weights: list[list[list[float]]] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    decode: list[bool] = field(default_factory=list)

    def add(self, step: int, decode: bool, ids: list[Any], ws: list[Any]) -> None:
        """Append one forward pass: ``ids[l]``/``ws[l]`` are [tokens][top_k] per layer."""
        tokens = len(ids[0]) if ids else 0
        for t in range(tokens):
            self.experts.append([[int(e) for e in layer[t]] for layer in ids])
            self.weights.append([[float(w) for w in layer[t]] for layer in ws])
            self.step.append(step)
            self.decode.append(decode)

    def subset(self, keep: list[bool]) -> Trace:
        out = Trace()
        for i, k in enumerate(keep):
            if k:
                out.experts.append(self.experts[i])
                out.weights.append(self.weights[i])
                out.step.append(self.step[i])
                out.decode.append(self.decode[i])
        return out


def write_trace(trace: Trace, path: str, npz: bool = True) -> list[str]:
    """Write ``path`` (JSON lines) and, with ``npz``, the same arrays next to it as
    ``.npz`` (``path`` minus ``.jsonl``); returns the paths written."""
    with open(path, "w", encoding="utf-8") as fh:
        for s, e, w in zip(trace.step, trace.experts, trace.weights):
            row = {"step": s, "experts": e, "weights": [[round(x, 6) for x in r] for r in w]}
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    written = [path]
    if npz:
        import numpy as np

        base = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
        np.savez_compressed(
            base + ".npz",
            experts=np.asarray(trace.experts, dtype=np.int16),
            weights=np.asarray(trace.weights, dtype=np.float32),
            step=np.asarray(trace.step, dtype=np.int32),
        )
        written.append(base + ".npz")
    return written


def _smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_record(argv: list[str], **extra: Any) -> dict[str, Any]:
    """Versions, device, date and command line."""
    rec: dict[str, Any] = {
        "kind": "env",
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": argv,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import torch

        rec["torch"] = torch.__version__
        rec["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            rec["gpu"] = torch.cuda.get_device_name(0)
            rec["smi"] = _smi()
    except ImportError:
        pass
    try:
        import transformers

        rec["transformers"] = transformers.__version__
    except ImportError:
        pass
    rec.update(extra)
    return rec


# --- Hugging Face models --------------------------------------------------------------


def _is_router(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith(("TopKRouter", "TopkRouter"))


def _select(router: Any, logits: Any, like: Any) -> tuple[Any, Any]:
    """The router's own selection from (biased) ``logits``: softmax, group-limited greedy
    (DeepSeek, when configured), top-k, renormalisation and scaling as the router class
    does them; weights in ``like``'s dtype."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    k = int(router.top_k)
    groups = int(getattr(router, "num_group", 1) or 1)
    if getattr(router, "topk_method", "greedy") == "group_limited_greedy" and groups > 1:
        g = probs.view(probs.shape[0], groups, -1).max(dim=-1).values
        gi = torch.topk(g, k=int(router.topk_group), dim=-1).indices
        mask = torch.zeros_like(g).scatter_(1, gi, 1.0).bool()
        probs = probs.masked_fill(~mask.repeat_interleave(probs.shape[1] // groups, 1), 0.0)
    w, idx = torch.topk(probs, k, dim=-1)
    if type(router).__name__.startswith("Mixtral") or getattr(router, "norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * float(getattr(router, "routed_scaling_factor", 1.0))
    return w.to(like.dtype), idx


class RouterTap:
    """Forward hooks on a model's routers: record each call's top-k (best first) and, with
    a bias, replace the router's selection by the one of the biased logits."""

    def __init__(self, model: Any, bias: list[list[float]] | None) -> None:
        import torch

        self.routers = [m for m in model.modules() if _is_router(m)]
        self.calls: list[tuple[Any, Any]] = []
        self.bias = (
            None
            if bias is None
            else [torch.tensor(b, dtype=torch.float32, device=_device(model)) for b in bias]
        )
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> Any:
            import torch

            logits, weights, idx = out
            if self.bias is not None:
                logits = (logits.float() + self.bias[i]).to(logits.dtype)
                weights, idx = _select(module, logits, weights)
                out = (logits, weights, idx)
            order = torch.argsort(weights.float(), dim=-1, descending=True)
            self.calls.append(
                (torch.gather(idx, 1, order).cpu(), torch.gather(weights.float(), 1, order).cpu())
            )
            return out

        return hook

    def take(self) -> tuple[list[Any], list[Any]]:
        """The calls since the last take: per MoE layer, ids and weights [tokens, k]."""
        calls, self.calls = self.calls, []
        if len(calls) != len(self.routers):
            raise RuntimeError(f"{len(calls)} router calls for {len(self.routers)} routers")
        return [c[0].tolist() for c in calls], [c[1].tolist() for c in calls]


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def build_hf(shape: str, layers: int, device: str, tiny: bool, seed: int) -> Any:
    """A random-weight transformers model of ``shape`` (bf16 on GPU, fp32 on CPU); router
    weights N(0, initializer_range) (some classes start them at zero)."""
    import torch
    import transformers

    cls = getattr(transformers, SHAPES[shape]["config"])
    cfg = cls(**hf_keys(shape, layers, tiny))
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if _is_router(m):
                m.weight.normal_(0.0, cfg.initializer_range)
    return model


def router_bias(std: float, layers: int, experts: int, seed: int) -> list[list[float]] | None:
    """Per MoE layer, a per-expert logit bias ``std x N(0, 1)`` (None when std is 0)."""
    if std <= 0:
        return None
    rng = random.Random(f"router-bias-{seed}")
    return [[std * rng.gauss(0.0, 1.0) for _ in range(experts)] for _ in range(layers)]


def record_hf(
    shape: str,
    layers: int,
    *,
    prompts: int,
    prompt_tokens: int,
    decode_tokens: int,
    bias_std: float,
    seed: int,
    device: str,
    tiny: bool = False,
) -> tuple[Trace, dict[str, Any]]:
    """Record a trace from the HF model (see the module docstring); returns it and the
    env fields that describe it."""
    import torch
    import transformers

    model = build_hf(shape, layers, device, tiny, seed)
    n_moe = moe_layers(shape, layers)
    experts = int(
        SHAPES[shape].get("num_local_experts")
        or SHAPES[shape].get("num_experts")
        or SHAPES[shape]["n_routed_experts"]
    )
    bias = router_bias(bias_std, n_moe, experts, seed)
    tap = RouterTap(model, bias)
    if len(tap.routers) != n_moe:
        raise RuntimeError(f"found {len(tap.routers)} routers, expected {n_moe} MoE layers")
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = int(model.config.vocab_size)
    trace = Trace()
    step = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(prompts):
            ids = torch.tensor([zipf_ids(rng, vocab, prompt_tokens)], device=device)
            cache = transformers.DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            trace.add(step, False, *tap.take())
            step += 1
            for _ in range(decode_tokens):
                p = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
                nxt = torch.multinomial(p, 1, generator=gen)
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                trace.add(step, True, *tap.take())
                step += 1
    wall = time.perf_counter() - t0
    info = {
        "source": "hf",
        "shape": shape,
        "layers": layers,
        "moe_layers": n_moe,
        "experts": experts,
        "top_k": int(SHAPES[shape]["num_experts_per_tok"]),
        "tiny": tiny,
        "hf_config": model.config.to_dict(),
        "weights": "random (from_config; routers N(0, initializer_range))",
        "router_bias_std": bias_std,
        "router_bias": bias,
        "skew": (
            "synthetic: a seeded per-expert logit bias on random weights"
            if bias
            else "none: random weights route near-uniformly"
        ),
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prompt_law": "zipf(1.1) over the vocabulary, seeded",
        "decode_sampling": "temperature 1 from the model's logits, seeded",
        "seed": seed,
        "device": device,
        "record_wall_s": round(wall, 3),
    }
    for h in tap.handles:
        h.remove()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return trace, info


# --- moesim's numpy reference ---------------------------------------------------------


def record_reference(
    shape: str,
    layers: int,
    *,
    prompts: int,
    prompt_tokens: int,
    decode_tokens: int,
    bias_std: float,
    seed: int,
    d_model: int,
    d_ff: int,
) -> tuple[Trace, dict[str, Any]]:
    """Record a trace from moesim's numpy reference layer (see the module docstring)."""
    import numpy as np

    from moesim.loader import scenario_from_dict
    from moesim.reference.dispatch import build_plan, gather, run_experts, scatter_combine
    from moesim.reference.gating import (
        combine_weights,
        gate_logits,
        group_limited_ranking,
        rank_experts,
        score,
        selection_scores,
    )
    from moesim.reference.layer import ReferenceLayer, shared_output

    m = scenario_from_dict(
        {
            "name": "trace",
            "cluster": "single-h200",
            "model": shape,
            "workload": {"kind": "layer", "tokens": 1},
        }
    ).model
    gen = np.random.default_rng(seed)
    stack = [
        ReferenceLayer.from_model(m, gen, d_model=d_model, d_ff=d_ff, dtype=np.float32)
        for _ in range(layers)
    ]
    bias = router_bias(bias_std, layers, m.experts, seed)
    vocab = 4096
    table = gen.standard_normal((vocab, d_model)).astype(np.float32)
    rng = random.Random(seed)
    k = m.top_k

    def run(x: np.ndarray) -> tuple[list[Any], list[Any]]:
        ids_out, ws_out = [], []
        for j, layer in enumerate(stack):
            logits = gate_logits(x, layer.w_router)
            if bias is not None:
                logits = logits + np.asarray(bias[j], dtype=np.float32)
            probs = score(logits, layer.router)
            sel = selection_scores(probs, layer.expert_bias)
            if layer.expert_groups is not None and layer.topk_groups is not None:
                ranking, _ = group_limited_ranking(sel, layer.expert_groups, layer.topk_groups)
            else:
                ranking = rank_experts(sel)
            ranking = ranking[:, :k]
            w = combine_weights(probs, ranking, ranking, k, layer.router == "sigmoid", 1.0)
            plan = build_plan(ranking, w, layer.experts)
            y = scatter_combine(run_experts(layer.routed, gather(x, plan), plan), plan, len(x))
            x = x + y + shared_output(layer, x)
            x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6)
            ids_out.append(ranking.tolist())
            ws_out.append(w.tolist())
        return ids_out, ws_out

    trace = Trace()
    step = 0
    for _ in range(prompts):
        trace.add(step, False, *run(table[zipf_ids(rng, vocab, prompt_tokens)]))
        step += 1
        for _ in range(decode_tokens):
            trace.add(step, True, *run(table[zipf_ids(rng, vocab, 1)]))
            step += 1
    info = {
        "source": "reference",
        "shape": shape,
        "layers": layers,
        "moe_layers": layers,
        "experts": m.experts,
        "top_k": k,
        "d_model": d_model,
        "d_ff": d_ff,
        "weights": "random N(0, 1/fan_in) (moesim.reference ReferenceLayer.from_model)",
        "router_bias_std": bias_std,
        "router_bias": bias,
        "skew": "synthetic: a seeded per-expert logit bias" if bias else "none",
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "seed": seed,
        "device": "cpu (numpy)",
    }
    return trace, info


def save(
    trace: Trace, info: dict[str, Any], out: str, argv: list[str], decode_only: bool
) -> list[str]:
    """Write the trace files and the env record next to them; returns the paths."""
    base = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    written = write_trace(trace, base + ".jsonl")
    counts = {"trace_tokens": len(trace.step), "trace_decode_tokens": sum(trace.decode)}
    if decode_only:
        dec = trace.subset(trace.decode)
        written += write_trace(dec, base + ".decode.jsonl", npz=False)
    env = env_record(argv, **info, **counts, files=written)
    with open(base + ".env.json", "w", encoding="utf-8") as fh:
        json.dump(env, fh, indent=1)
        fh.write("\n")
    return [*written, base + ".env.json"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output path (OUT.jsonl, OUT.npz, OUT.env.json)")
    ap.add_argument("--source", choices=("hf", "reference"), default="hf")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (hf) / MoE layers")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--router-bias-std", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="run the HF model on the CPU")
    ap.add_argument("--tiny", action="store_true", help="shrunk widths (a CPU dry run)")
    ap.add_argument("--d-model", type=int, default=256, help="reference widths")
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--decode-only", action="store_true", help="also OUT.decode.jsonl")
    args = ap.parse_args(argv)
    common = {
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "bias_std": args.router_bias_std,
        "seed": args.seed,
    }
    if args.source == "hf":
        trace, info = record_hf(
            args.shape,
            args.layers,
            device="cpu" if args.cpu else "cuda",
            tiny=args.tiny,
            **common,
        )
    else:
        trace, info = record_reference(
            args.shape, args.layers, d_model=args.d_model, d_ff=args.d_ff, **common
        )
    for p in save(
        trace, info, args.out, ["-m", "moesim.calibrate.torch_routing", *argv], args.decode_only
    ):
        print(p)
    e = len(trace.step)
    print(
        f"{e} tokens, {info['moe_layers']} MoE layers, top-{info['top_k']} of {info['experts']}"
        f" ({'bias std ' + str(args.router_bias_std) if args.router_bias_std else 'no bias'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
