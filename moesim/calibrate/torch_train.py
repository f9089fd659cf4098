# ruff: noqa: B023  (the timed closures run inside the iteration that defines them)
"""Training steps and capacity-padded MoE layers on one GPU, measured (issue #11).

Builds decoder stacks of catalog models (fewer layers, the catalog's widths) in plain
PyTorch with random weights: embedding, per block RMSNorm -> attention (fused QKV
projection, RoPE, optional QK-norm, causal ``scaled_dot_product_attention``, output
projection) -> residual -> RMSNorm -> MoE (router, softmax top-k, experts, weighted
combine) -> residual, then the final norm, the LM head and a cross-entropy loss on random
targets. Experts in three forms:

- ``grouped``: rows sorted by expert, one ``torch._grouped_mm`` per projection (forward
  and backward), combine by ``index_add_`` (Megatron-Core / torchtitan style);
- ``loop``: the same rows, a Python loop of per-expert products after reading the
  per-expert counts on the host (Hugging Face style);
- ``padded``: Switch / GShard / Mesh-TF style: tokens in groups of ``group_size``, a
  one-hot dispatch tensor ``[groups, group, experts, capacity]`` built from a cumulative
  sum over the one-hot expert choices (first choices before second ones), positions
  beyond the capacity dropped, a dispatch einsum into ``[experts, groups x capacity,
  d_model]``, batched expert products over every slot (padding included), and a combine
  einsum weighted by the router probabilities.

Two precision recipes: ``bf16`` (bf16 parameters and gradients, AdamW states in bf16) and
``amp_fp32_master`` (fp32 parameters, the forward under ``torch.autocast`` to bf16 --
expert weights cast explicitly, as autocast does for products --, fp32 gradients and
AdamW states). The optimizer is ``torch.optim.AdamW(fused=True)``.

Records (JSON lines), times in ms (medians of CUDA-event timings after warm-up):

- ``train_step``: per (model, layers, precision, form, tokens): ``fwd_ms`` (forward +
  loss), ``fwd_bwd_ms`` (+ backward), ``opt_ms`` (the optimizer step alone),
  ``step_ms`` (zero_grad + forward + backward + optimizer), ``peak_bytes`` (peak allocated
  during a step), ``static_bytes`` (allocated before a step: parameters + optimizer
  states), parameter counts;
- ``train_part``: one block's attention half and MoE half, and the head + loss, forward
  and forward + backward, at one token count (to locate differences);
- ``padded_layer``: one MoE layer in padded form (and grouped, for reference), forward
  and forward + backward, over token counts, capacity factors and group sizes.

    python3 -m moesim.calibrate.torch_train --out train.jsonl [--quick] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F

from moesim.calibrate.torch_moe_consts import CATALOG
from moesim.calibrate.torch_timing import Deadline, Sink, log

BF16 = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    """The widths of one catalog model, with a chosen number of layers."""

    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    d_ff: int
    gated: bool
    qk_norm: bool
    norm_topk: bool

    def tiny(self) -> Shape:
        return replace(
            self,
            d_model=64,
            heads=4,
            kv_heads=min(self.kv_heads, 4) if self.kv_heads < self.heads else 4,
            head_dim=16,
            vocab=256,
            experts=min(self.experts, 8),
            top_k=min(self.top_k, 2),
            d_ff=32,
        )


def load_shape(name: str, layers: int) -> Shape:
    import yaml

    with open(CATALOG) as fh:
        m = yaml.safe_load(fh)[name]
    heads = int(m["heads"])
    d = int(m["d_model"])
    return Shape(
        name=name,
        layers=layers,
        d_model=d,
        heads=heads,
        kv_heads=int(m.get("kv_heads") or heads),
        head_dim=int(m.get("head_dim") or d // heads),
        vocab=int(m["vocab_size"]),
        experts=int(m["experts"]),
        top_k=int(m["top_k"]),
        d_ff=int(m["expert_d_ff"]),
        gated=str(m.get("activation", "swiglu")) in ("swiglu", "geglu"),
        qk_norm=bool(m.get("qk_norm", False)),
        # Mixtral renormalises its top-k weights; OLMoE and Switch keep the softmax values
        norm_topk=name.startswith("mixtral"),
    )


# --------------------------------------------------------------------------- experts


class Experts(torch.nn.Module):
    """Routed experts ``[E, 2*d_ff or d_ff, d]`` (up, gate first) and ``[E, d, d_ff]``."""

    def __init__(self, s: Shape, dev: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.s = s
        n_up = (2 if s.gated else 1) * s.d_ff
        self.router = torch.nn.Parameter(torch.empty(s.experts, s.d_model, device=dev, dtype=dtype))
        self.w_up = torch.nn.Parameter(
            torch.empty(s.experts, n_up, s.d_model, device=dev, dtype=dtype)
        )
        self.w_down = torch.nn.Parameter(
            torch.empty(s.experts, s.d_model, s.d_ff, device=dev, dtype=dtype)
        )
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.02)
        self.form = "grouped"
        self.capacity_factor = 1.0
        self.group_size = 1024
        self.align = 1

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.s.gated:
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        return F.relu(h)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        # autocast does not cover _grouped_mm/bmm of parameters the same way everywhere:
        # cast explicitly, as autocast casts a product's fp32 operands (once per forward)
        if self.w_up.dtype != BF16 and torch.is_autocast_enabled(self.w_up.device.type):
            return self.w_up.to(BF16), self.w_down.to(BF16)
        return self.w_up, self.w_down

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.router)
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.s.top_k, dim=-1)
        if self.s.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = self.w_up.dtype != BF16 and torch.is_autocast_enabled(x.device.type)
        return self._forward(x.to(BF16) if cast else x).to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.route(x)
        if self.form == "padded":
            return self._padded(x, w, ids)
        k = self.s.top_k
        sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
        token_idx = order // k
        xs = x.index_select(0, token_idx)
        w_up, w_down = self._weights()
        if self.form == "grouped":
            counts = torch.bincount(sorted_ids, minlength=self.s.experts)
            if self.align > 1:  # pad each expert's rows to a multiple of align
                a = self.align
                padded = (counts + a - 1) // a * a
                pends = torch.cumsum(padded, 0)
                starts = torch.cumsum(counts, 0) - counts
                dest = (
                    (pends - padded)[sorted_ids]
                    + torch.arange(xs.shape[0], device=x.device)
                    - starts[sorted_ids]
                )
                buf = xs.new_zeros((int(xs.shape[0]) + self.s.experts * (a - 1), xs.shape[1]))
                buf = buf.index_copy(0, dest, xs)
                offs = pends.to(torch.int32)
                h = torch._grouped_mm(buf, w_up.transpose(-2, -1), offs=offs)
                ys = torch._grouped_mm(self._act(h), w_down.transpose(-2, -1), offs=offs)
                ys = ys.index_select(0, dest)
            else:
                offs = torch.cumsum(counts, 0).to(torch.int32)
                h = torch._grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)
                ys = torch._grouped_mm(self._act(h), w_down.transpose(-2, -1), offs=offs)
        else:  # loop: the counts read on the host, one product chain per touched expert
            ends = torch.bincount(sorted_ids, minlength=self.s.experts).cumsum(0).tolist()
            outs, start = [], 0
            for e, end in enumerate(ends):
                if end > start:
                    a = self._act(xs[start:end] @ w_up[e].t())
                    outs.append(a @ w_down[e].t())
                start = end
            ys = torch.cat(outs, 0)
        ws = w.reshape(-1).index_select(0, order).unsqueeze(-1)
        y = torch.zeros_like(x)
        return y.index_add(0, token_idx, ys * ws)

    def capacity(self, group: int) -> int:
        return max(1, math.ceil(self.capacity_factor * group * self.s.top_k / self.s.experts))

    def _padded(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        e, k = self.s.experts, self.s.top_k
        g_size = min(self.group_size, t)
        groups = t // g_size
        cap = self.capacity(g_size)
        xg = x.reshape(groups, g_size, d)
        ids_g = ids.reshape(groups, g_size, k)
        w_g = w.reshape(groups, g_size, k)
        dispatch = x.new_zeros((groups, g_size, e, cap))
        combine = x.new_zeros((groups, g_size, e, cap))
        filled = torch.zeros((groups, 1, e), device=x.device, dtype=torch.int64)
        slots = torch.arange(cap, device=x.device)
        for j in range(k):  # first choices take slots before second ones (GShard)
            mask = F.one_hot(ids_g[:, :, j], e)  # [g, G, E]
            pos = torch.cumsum(mask, dim=1) - 1 + filled  # slot of each token at its expert
            filled = filled + mask.sum(dim=1, keepdim=True)
            keep = mask * (pos < cap)
            # one-hot over the capacity, built as floats (as Mesh-TF's one_hot does)
            slot = ((pos.unsqueeze(-1) == slots) & keep.unsqueeze(-1).bool()).to(x.dtype)
            dispatch = dispatch + slot
            combine = combine + slot * w_g[:, :, j, None, None]
        w_up, w_down = self._weights()
        xe = torch.einsum("gtec,gtd->egcd", dispatch, xg).reshape(e, groups * cap, d)
        h = torch.bmm(xe, w_up.transpose(1, 2))
        ye = torch.bmm(self._act(h), w_down.transpose(1, 2)).reshape(e, groups, cap, d)
        return torch.einsum("gtec,egcd->gtd", combine, ye).reshape(t, d)


# --------------------------------------------------------------------------- the stack


def _rope(s: Shape, seq: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, s.head_dim, 2, device=dev).float() / s.head_dim))
    ang = torch.outer(torch.arange(seq, device=dev).float(), inv)
    return torch.cos(ang).to(BF16), torch.sin(ang).to(BF16)


def _apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = q.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, s: Shape, dev: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.s = s
        self.norm = torch.nn.RMSNorm(s.d_model, device=dev, dtype=dtype)
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.qkv = torch.nn.Linear(s.d_model, qkv, bias=False, device=dev, dtype=dtype)
        self.out = torch.nn.Linear(
            s.heads * s.head_dim, s.d_model, bias=False, device=dev, dtype=dtype
        )
        self.q_norm = self.k_norm = None
        if s.qk_norm:
            self.q_norm = torch.nn.RMSNorm(s.heads * s.head_dim, device=dev, dtype=dtype)
            self.k_norm = torch.nn.RMSNorm(s.kv_heads * s.head_dim, device=dev, dtype=dtype)
        for lin in (self.qkv, self.out):
            torch.nn.init.normal_(lin.weight, std=0.02)

    def forward(
        self, x: torch.Tensor, seqs: int, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        s = self.s
        t = x.shape[0]
        seq = t // seqs
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.split(
            [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1
        )
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(seqs, seq, s.heads, s.head_dim).transpose(1, 2)
        k = k.reshape(seqs, seq, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.reshape(seqs, seq, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=s.kv_heads != s.heads
        )
        return x + self.out(o.transpose(1, 2).reshape(t, s.heads * s.head_dim))


ExpertsFactory = Callable[[Shape, torch.device, torch.dtype], torch.nn.Module]


class MoEHalf(torch.nn.Module):
    def __init__(
        self,
        s: Shape,
        dev: torch.device,
        dtype: torch.dtype,
        experts: ExpertsFactory | None = None,
    ) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(s.d_model, device=dev, dtype=dtype)
        self.experts = (experts or Experts)(s, dev, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.experts(self.norm(x))


class Stack(torch.nn.Module):
    def __init__(
        self,
        s: Shape,
        dev: torch.device,
        dtype: torch.dtype,
        experts: ExpertsFactory | None = None,
    ) -> None:
        super().__init__()
        self.s = s
        self.embed = torch.nn.Embedding(s.vocab, s.d_model, device=dev, dtype=dtype)
        self.attn = torch.nn.ModuleList(Attention(s, dev, dtype) for _ in range(s.layers))
        self.moe = torch.nn.ModuleList(MoEHalf(s, dev, dtype, experts) for _ in range(s.layers))
        self.norm = torch.nn.RMSNorm(s.d_model, device=dev, dtype=dtype)
        self.head = torch.nn.Linear(s.d_model, s.vocab, bias=False, device=dev, dtype=dtype)
        torch.nn.init.normal_(self.embed.weight, std=0.02)
        torch.nn.init.normal_(self.head.weight, std=0.02)

    def set_form(
        self, form: str, capacity_factor: float = 1.0, group_size: int = 1024, align: int = 1
    ) -> None:
        for m in self.moe:
            ex = m.experts
            ex.form, ex.capacity_factor, ex.group_size, ex.align = (
                form,
                capacity_factor,
                group_size,
                align,
            )

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, seqs: int) -> torch.Tensor:
        """The loss (so that wrappers such as DDP can call the stack)."""
        return self.loss(tokens, targets, seqs)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, seqs: int) -> torch.Tensor:
        rope = _rope(self.s, tokens.shape[0] // seqs, tokens.device)
        x = self.embed(tokens)
        for a, m in zip(self.attn, self.moe, strict=True):
            x = m(a(x, seqs, rope))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float(), targets)


# --------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, dev: torch.device, reps: int, warmup: int) -> None:
        self.cuda = dev.type == "cuda"
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn: Callable[[], Any], between: Callable[[], Any] | None = None) -> float:
        """Median ms of ``fn``; ``between`` runs untimed before each call."""
        import time

        for _ in range(self.warmup):
            if between:
                between()
            fn()
        times = []
        for _ in range(self.reps):
            if between:
                between()
            if self.cuda:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(float(a.elapsed_time(b)))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def _autocast(dev: torch.device, precision: str) -> Any:
    import contextlib

    if precision == "amp_fp32_master":
        return torch.autocast(dev.type, dtype=BF16)
    return contextlib.nullcontext()


def _alloc(dev: torch.device) -> int:
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else 0


def measure_steps(
    sink: Sink,
    dev: torch.device,
    shape: Shape,
    precision: str,
    cases: Sequence[tuple[str, int, float]],
    seq_len: int,
    timer: Timer,
    deadline: Deadline,
    align: int,
    parts_tokens: int | None,
) -> None:
    """Training steps of one stack under one precision, for (form, tokens, cf) cases."""
    dtype = BF16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Stack(shape, dev, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for m in model.moe for p in (m.experts.w_up, m.experts.w_down))
    common = {
        "model": shape.name,
        "layers": shape.layers,
        "precision": precision,
        "param_dtype": str(dtype).removeprefix("torch."),
        "params": n_params,
        "expert_params": n_expert,
        "seq_len": seq_len,
        "optimizer": "AdamW(fused)",
    }
    for form, tokens, cf in cases:
        if deadline.exceeded():
            log("budget spent: steps stop")
            break
        seqs = max(1, tokens // seq_len)
        seq = tokens // seqs
        model.set_form(form, cf, 1024, align)
        gen = torch.Generator(device=dev).manual_seed(tokens)
        ids = torch.randint(0, shape.vocab, (tokens,), device=dev, generator=gen)
        tgt = torch.randint(0, shape.vocab, (tokens,), device=dev, generator=gen)

        def fwd() -> torch.Tensor:
            with _autocast(dev, precision):
                return model.loss(ids, tgt, seqs)

        def fwd_bwd() -> None:
            fwd().backward()

        def zero() -> None:
            opt.zero_grad(set_to_none=True)

        def step() -> None:
            zero()
            fwd_bwd()
            opt.step()

        try:
            step()  # optimizer states exist from here on
            zero()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            static = _alloc(dev)
            t_fwd = timer(lambda: fwd().detach())
            t_fb = timer(fwd_bwd, zero)
            t_opt = timer(opt.step, None)  # gradients of the last fwd_bwd stay in place
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t_step = timer(step)
            peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0
        except torch.OutOfMemoryError:
            zero()
            sink.write("skipped", **common, form=form, tokens=tokens, reason="out of memory")
            log(f"{shape.name} {precision} {form} {tokens}: out of memory")
            continue
        sink.write(
            "train_step",
            **common,
            form=form,
            tokens=tokens,
            sequences=seqs,
            seq=seq,
            capacity_factor=cf if form == "padded" else None,
            group_size=1024 if form == "padded" else None,
            align=align if form == "grouped" else None,
            fwd_ms=t_fwd,
            fwd_bwd_ms=t_fb,
            opt_ms=t_opt,
            step_ms=t_step,
            static_bytes=static,
            peak_bytes=peak,
        )
        log(
            f"{shape.name} L{shape.layers} {precision:15s} {form:7s} {tokens:6d}: fwd {t_fwd:7.1f} "
            f"fb {t_fb:7.1f} opt {t_opt:6.1f} step {t_step:7.1f} ms peak {peak / 2**30:5.1f} GiB"
        )
    if parts_tokens and not deadline.exceeded():
        _parts(sink, dev, model, precision, parts_tokens, seq_len, timer, common, align)


def profile_parts(
    sink: Sink, dev: torch.device, s: Shape, precision: str, tokens: int, seq_len: int, align: int
) -> None:
    """Print the kernels of one block's halves (forward + backward) under the profiler, and
    record the bytes each half keeps for its backward (``train_part_memory``)."""
    from torch.profiler import ProfilerActivity, profile

    dtype = BF16 if precision == "bf16" else torch.float32
    model = Stack(replace(s, layers=1), dev, dtype)
    model.set_form("grouped" if dev.type == "cuda" else "loop", align=align)
    seqs = max(1, tokens // seq_len)
    x0 = (torch.randn(tokens, s.d_model, device=dev) * 0.5).to(dtype).requires_grad_(True)
    rope = _rope(s, tokens // seqs, dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for part, fn in (
        ("attention", lambda: model.attn[0](x0, seqs, rope)),
        ("moe", lambda: model.moe[0](x0)),
    ):
        for _ in range(2):
            with _autocast(dev, precision):
                out = fn()
            out.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(dev)
            with _autocast(dev, precision):
                out = fn()
            torch.cuda.synchronize()
            kept = torch.cuda.memory_allocated(dev) - before
            sink.write(
                "train_part_memory",
                model=s.name,
                precision=precision,
                part=part,
                tokens=tokens,
                sequences=seqs,
                d_model=s.d_model,
                saved_bytes=int(kept),
            )
            log(f"{s.name} {precision} {part}: keeps {kept / 2**20:.0f} MiB for backward")
            del out
        with profile(activities=acts) as prof:
            with _autocast(dev, precision):
                out = fn()
            out.float().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(f"== {s.name} {precision} {part} {tokens} tokens", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
        model.zero_grad(set_to_none=True)
        x0.grad = None


def _parts(
    sink: Sink,
    dev: torch.device,
    model: Stack,
    precision: str,
    tokens: int,
    seq_len: int,
    timer: Timer,
    common: dict[str, Any],
    align: int,
) -> None:
    """One block's halves and the head, forward and forward + backward, grouped form."""
    model.set_form("grouped" if dev.type == "cuda" else "loop", align=align)
    seqs = max(1, tokens // seq_len)
    s = model.s
    dtype = model.head.weight.dtype
    x0 = (torch.randn(tokens, s.d_model, device=dev) * 0.5).to(dtype).requires_grad_(True)
    tgt = torch.randint(0, s.vocab, (tokens,), device=dev)
    rope = _rope(s, tokens // seqs, dev)
    pieces: dict[str, Callable[[], torch.Tensor]] = {
        "attention": lambda: model.attn[0](x0, seqs, rope),
        "moe": lambda: model.moe[0](x0),
        "head_loss": lambda: F.cross_entropy(model.head(model.norm(x0)).float(), tgt),
    }
    for name, fn in pieces.items():

        def fwd(fn: Callable[[], torch.Tensor] = fn) -> torch.Tensor:
            with _autocast(dev, precision):
                return fn()

        def fb(fwd: Callable[[], torch.Tensor] = fwd) -> None:
            fwd().float().sum().backward()

        def clear() -> None:
            model.zero_grad(set_to_none=True)
            x0.grad = None

        def fwd_only(fwd: Callable[[], torch.Tensor] = fwd) -> torch.Tensor:
            return fwd().detach()

        t_f = timer(fwd_only)
        t_fb = timer(fb, clear)
        clear()
        sink.write(
            "train_part",
            **common,
            part=name,
            tokens=tokens,
            sequences=seqs,
            fwd_ms=t_f,
            fwd_bwd_ms=t_fb,
        )
        log(f"  part {name:9s} {tokens}: fwd {t_f:6.2f} fb {t_fb:6.2f} ms")


def measure_padded(
    sink: Sink,
    dev: torch.device,
    shape: Shape,
    tokens_list: Sequence[int],
    cfs: Sequence[float],
    groups: Sequence[int],
    timer: Timer,
    deadline: Deadline,
) -> None:
    """One MoE layer (bf16) in padded form over capacity factors and group sizes, with the
    grouped form at the same tokens for reference; forward and forward + backward."""
    torch.manual_seed(1)
    ex = Experts(shape, dev, BF16)
    for tokens in tokens_list:
        x = (torch.randn(tokens, shape.d_model, device=dev) * 0.5).to(BF16).requires_grad_(True)
        variants: list[tuple[str, float | None, int | None]] = [("grouped", None, None)]
        variants += [("padded", cf, g) for g in groups if g <= tokens for cf in cfs]
        for form, cf, g in variants:
            if deadline.exceeded():
                log("budget spent: padded layers stop")
                return
            ex.form = form
            if cf is not None and g is not None:
                ex.capacity_factor, ex.group_size = cf, g

            def fb() -> None:
                ex(x).float().sum().backward()

            def clear() -> None:
                ex.zero_grad(set_to_none=True)
                x.grad = None

            try:
                with torch.no_grad():
                    t_f = timer(lambda: ex(x))
                t_fb = timer(fb, clear)
            except torch.OutOfMemoryError:
                clear()
                sink.write(
                    "skipped",
                    model=shape.name,
                    tokens=tokens,
                    form=form,
                    capacity_factor=cf,
                    group_size=g,
                    reason="out of memory",
                )
                continue
            clear()
            cap = ex.capacity(g) if g else None
            sink.write(
                "padded_layer",
                model=shape.name,
                form=form,
                tokens=tokens,
                experts=shape.experts,
                top_k=shape.top_k,
                d_model=shape.d_model,
                expert_d_ff=shape.d_ff,
                gated=shape.gated,
                capacity_factor=cf,
                group_size=g,
                capacity=cap,
                dtype="bf16",
                fwd_ms=t_f,
                fwd_bwd_ms=t_fb,
            )
            log(
                f"padded {shape.name} {tokens:6d} {form:7s} cf {cf} g {g} C {cap}: "
                f"fwd {t_f:7.2f} fb {t_fb:7.2f} ms"
            )


def measure_primitives(sink: Sink, dev: torch.device, timer: Timer, quick: bool) -> None:
    """The kernels a training step adds to the layers moesim already prices: causal
    attention (``scaled_dot_product_attention``) forward and backward, the cross-entropy
    loss over the vocabulary (fp32 logits), fused AdamW steps, weight casts and RMSNorm."""
    div = 16 if quick else 1
    sdpa_shapes = [  # sequences, seq, heads, kv_heads, head_dim
        (1, 4096, 16, 16, 128),
        (2, 4096, 16, 16, 128),
        (4, 4096, 32, 8, 128),
        (1, 8192, 32, 8, 128),
        (8, 1024, 16, 16, 128),
        (2, 2048, 48, 8, 128),
        (4, 2048, 12, 12, 64),
    ]
    for b, n, h, kv, hd in sdpa_shapes:
        n = max(16, n // div)
        q = torch.randn(b, h, n, hd, device=dev, dtype=BF16, requires_grad=True)
        k = torch.randn(b, kv, n, hd, device=dev, dtype=BF16, requires_grad=True)
        v = torch.randn(b, kv, n, hd, device=dev, dtype=BF16, requires_grad=True)

        def att() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)

        def clear() -> None:
            q.grad = k.grad = v.grad = None

        with torch.no_grad():
            t_f = timer(att)
        go = torch.randn(b, h, n, hd, device=dev, dtype=BF16)
        t_fb = timer(lambda: att().backward(go), clear)
        flops = 4 * b * h * n * n * hd / 2  # QK^T and PV, causal half
        sink.write(
            "sdpa",
            sequences=b,
            seq=n,
            heads=h,
            kv_heads=kv,
            head_dim=hd,
            causal=True,
            dtype="bf16",
            fwd_ms=t_f,
            fwd_bwd_ms=t_fb,
            fwd_flops=flops,
        )
        log(
            f"sdpa {b}x{n} h{h}/{kv} d{hd}: fwd {t_f:.3f} fb {t_fb:.3f} ms "
            f"({flops / t_f / 1e9:.0f} TF/s fwd)"
        )
    for tokens, vocab in (
        (4096, 32000),
        (4096, 50304),
        (16384, 50304),
        (8192, 100352),
        (16384, 32000),
    ):
        tokens = max(16, tokens // div)
        logits = (torch.randn(tokens, vocab, device=dev) * 0.1).to(BF16).requires_grad_(True)
        tgt = torch.randint(0, vocab, (tokens,), device=dev)

        def ce() -> torch.Tensor:
            return F.cross_entropy(logits.float(), tgt)

        with torch.no_grad():
            t_f = timer(ce)
        t_fb = timer(lambda: ce().backward(), lambda: setattr(logits, "grad", None))
        sink.write(
            "cross_entropy",
            tokens=tokens,
            vocab=vocab,
            logits_dtype="bf16",
            compute_dtype="fp32",
            fwd_ms=t_f,
            fwd_bwd_ms=t_fb,
        )
        log(f"cross_entropy {tokens}x{vocab}: fwd {t_f:.3f} fb {t_fb:.3f} ms")
    for dtype in (BF16, torch.float32):
        for total in (256 << 20, 1 << 30):
            total //= div
            params = [
                torch.nn.Parameter(torch.randn(total // 16, device=dev, dtype=dtype) * 0.02)
                for _ in range(16)
            ]
            for p_ in params:
                p_.grad = torch.randn_like(p_) * 1e-3
            opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
            opt.step()
            t = timer(opt.step)
            name = str(dtype).removeprefix("torch.")
            sink.write(
                "adamw", params=total, tensors=16, dtype=name, fused=dev.type == "cuda", ms=t
            )
            log(f"adamw {name} {total / 1e6:.0f}M params: {t:.3f} ms")
        for total in (256 << 20,):
            total //= div
            w = torch.randn(total, device=dev, dtype=torch.float32)
            t = timer(lambda: w.to(BF16))
            sink.write("cast", elements=total, src="float32", dst="bfloat16", ms=t)
        for tokens, d in ((8192, 2048), (16384, 4096)):
            tokens = max(16, tokens // div)
            x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
            norm = torch.nn.RMSNorm(d, device=dev, dtype=dtype)
            with torch.no_grad():
                t_f = timer(lambda: norm(x))
            t_fb = timer(lambda: norm(x).sum().backward(), lambda: setattr(x, "grad", None))
            name = str(dtype).removeprefix("torch.")
            sink.write("rmsnorm", tokens=tokens, d_model=d, dtype=name, fwd_ms=t_f, fwd_bwd_ms=t_fb)
            log(f"rmsnorm {name} {tokens}x{d}: fwd {t_f:.3f} fb {t_fb:.3f} ms")


def measure_casts(sink: Sink, dev: torch.device, timer: Timer, quick: bool) -> None:
    """Weight-gradient casts as autocast's backward runs them: bf16 to fp32, contiguous,
    and strided (the gradient of a stacked expert weight used transposed, ``[E, N, K]``
    seen as ``[E, K, N]``), beside fp32 to bf16 (the forward's weight casts)."""
    div = 16 if quick else 1
    shapes = ((8, 28672, 4096), (64, 2048, 2048), (16, 21504, 6144))
    for e, n, k in shapes:
        n = max(8, n // div)
        src = torch.randn(e, k, n, device=dev, dtype=BF16)  # produced as [E, K, N]
        strided = src.transpose(-2, -1)  # the weight's [E, N, K] view
        for layout, x in (("contiguous", src), ("strided", strided)):
            t = timer(lambda: x.to(torch.float32))
            sink.write(
                "cast",
                elements=e * n * k,
                src="bfloat16",
                dst="float32",
                layout=layout,
                shape=[e, n, k],
                ms=t,
            )
            log(f"cast bf16->fp32 {layout} {e}x{n}x{k}: {t:.3f} ms")
        f32 = torch.randn(e, n, k, device=dev, dtype=torch.float32)
        t = timer(lambda: f32.to(BF16))
        sink.write(
            "cast",
            elements=e * n * k,
            src="float32",
            dst="bfloat16",
            layout="contiguous",
            shape=[e, n, k],
            ms=t,
        )


def check_forms(dev: torch.device, shape: Shape, align: int) -> dict[str, Any]:
    """Grouped, loop and padded (with capacity for every token) give the same layer."""
    torch.manual_seed(3)
    ex = Experts(shape, dev, torch.float32 if dev.type == "cpu" else BF16)
    x = torch.randn(256, shape.d_model, device=dev, dtype=ex.w_up.dtype)
    outs = {}
    with torch.no_grad():
        for form in ("grouped", "loop", "padded"):
            ex.form, ex.align = form, align
            ex.capacity_factor, ex.group_size = float(shape.experts), 256  # nothing dropped
            outs[form] = ex(x).double()
    ref = outs["loop"]
    errs = {f: float((o - ref).norm() / ref.norm()) for f, o in outs.items() if f != "loop"}
    return {
        "model": shape.name,
        "rel_err_vs_loop": errs,
        "ok": all(e < 2e-2 for e in errs.values()),
    }


def probe_align(dev: torch.device) -> int:
    """1 if ``_grouped_mm``'s backward takes unaligned groups here, else 16."""
    if dev.type != "cuda":
        return 1
    try:
        a = torch.randn(37, 64, device=dev, dtype=BF16, requires_grad=True)
        b = torch.randn(3, 64, 32, device=dev, dtype=BF16, requires_grad=True)
        offs = torch.tensor([5, 20, 37], device=dev, dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs).float().sum().backward()
        torch.cuda.synchronize()
        return 1
    except RuntimeError as exc:
        log(f"unaligned grouped_mm backward refused ({str(exc)[:120]}): rows padded to 16")
        return 16


# --------------------------------------------------------------------------- main


PLAN = {
    # model: (layers, token counts)
    "olmoe-1b-7b": (4, (4096, 8192, 16384)),
    "mixtral-8x7b": (2, (4096, 8192, 16384)),
}
HELD_OUT: tuple[tuple[str, int, int, tuple[int, ...], tuple[str, ...]], ...] = (
    # model, layers, seq_len, token counts, precisions (grouped form)
    ("olmoe-1b-7b", 8, 2048, (4096, 12288), ("bf16", "amp_fp32_master")),
    ("mixtral-8x7b", 4, 2048, (8192,), ("bf16", "amp_fp32_master")),
    ("dbrx", 1, 4096, (4096, 8192), ("bf16", "amp_fp32_master")),
    ("mixtral-8x22b", 1, 4096, (4096, 12288), ("bf16", "amp_fp32_master")),
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--quick", action="store_true", help="tiny widths, few cases (a dry run)")
    ap.add_argument(
        "--sections",
        default="check,steps,padded",
        help="check, primitives, casts, padded, steps, heldout, profile",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = set(args.sections.split(","))
    deadline = Deadline(args.budget_s)
    timer = Timer(dev, reps=2 if args.quick else args.reps, warmup=1 if args.quick else 2)
    with open(args.out, "w") as fh:
        sink = Sink(fh)
        env: dict[str, Any] = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": dev.type,
            "date": datetime.now(UTC).date().isoformat(),
            "argv": list(argv if argv is not None else sys.argv[1:]),
        }
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            env.update(name=p.name, sms=p.multi_processor_count, mem=p.total_memory)
        align = probe_align(dev)
        env["grouped_mm_backward_align"] = align
        sink.write("env", **env)
        shapes = {n: load_shape(n, layers) for n, (layers, _) in PLAN.items()}
        if args.quick:
            shapes = {n: replace(s.tiny(), layers=2) for n, s in shapes.items()}
        if "check" in sections:
            for s in shapes.values():
                rec = sink.write("check", **check_forms(dev, s, align))
                log(f"check {rec}")
        if "padded" in sections:
            cfs = (1.0, 1.25, 2.0)
            pshapes = [load_shape("switch-base-128", 1), shapes["mixtral-8x7b"]]
            if args.quick:
                pshapes = [
                    replace(load_shape("switch-base-128", 1).tiny(), experts=8, top_k=1),
                    shapes["mixtral-8x7b"],
                ]
            for s in pshapes:
                toks = (256,) if args.quick else (2048, 8192, 32768)
                grps = (64,) if args.quick else ((512, 2048) if s.top_k == 1 else (1024,))
                measure_padded(sink, dev, s, toks, cfs, grps, timer, deadline)
        seq_len = 64 if args.quick else args.seq_len
        if "steps" in sections:
            for name, s in shapes.items():
                counts: tuple[int, ...] = (128, 256) if args.quick else PLAN[name][1]
                small, mid, big = counts[0], counts[len(counts) // 2], counts[-1]
                # _grouped_mm's backward is a CUDA kernel: a CPU dry run steps the loop form
                forms = ("grouped",) if dev.type == "cuda" else ("loop",)
                for precision in ("bf16", "amp_fp32_master"):
                    cases: list[tuple[str, int, float]] = [
                        (f, t, 1.0) for f in forms for t in counts
                    ]
                    if precision == "bf16":
                        cases += [("loop", small, 1.0), ("loop", big, 1.0)]
                        if s.top_k <= 2:
                            cases += [("padded", mid, cf) for cf in (1.0, 1.25, 2.0)]
                    measure_steps(
                        sink,
                        dev,
                        s,
                        precision,
                        cases,
                        seq_len,
                        timer,
                        deadline,
                        align,
                        mid,
                    )
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
        if "primitives" in sections:
            measure_primitives(sink, dev, timer, args.quick)
        if "primitives" in sections or "casts" in sections:
            measure_casts(sink, dev, timer, args.quick)
        if "profile" in sections:  # where a block's time goes, kernel by kernel
            for name in ("olmoe-1b-7b", "mixtral-8x7b"):
                shp = shapes[name] if args.quick else load_shape(name, 1)
                for precision in ("bf16", "amp_fp32_master"):
                    n = 256 if args.quick else 8192
                    profile_parts(sink, dev, shp, precision, n, seq_len, align)
        if "heldout" in sections:
            for name, layers, seq, counts, precisions in HELD_OUT:
                s = load_shape(name, layers)
                if args.quick:
                    s, seq, counts = replace(s.tiny(), layers=layers), 64, (128,)
                form = "grouped" if dev.type == "cuda" else "loop"
                for precision in precisions:
                    measure_steps(
                        sink,
                        dev,
                        s,
                        precision,
                        [(form, t, 1.0) for t in counts],
                        seq,
                        timer,
                        deadline,
                        align,
                        None,
                    )
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
    log(f"done in {deadline.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
