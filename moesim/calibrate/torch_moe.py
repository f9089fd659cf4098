"""The real MoE layer the PyTorch harness measures (router, top-k, permute, grouped or
looped experts, combine, shared experts), its routing with a known popularity, grouped-GEMM
support probing, and model shapes from the catalog. See moesim.calibrate.torch_bench.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moesim.calibrate.torch_moe_consts import (
    CATALOG,
    CHECK_TOKENS,
    CHECK_TOL,
    GATED,
    ROUTER_SCALE,
    WEIGHT_STD,
)
from moesim.calibrate.torch_timing import (  # noqa: F401
    DTYPE_NAMES,
    _act,
    _gen,
    _randn,
    _rel_err,
    log,
)


def popularity(experts: int, routing: str) -> np.ndarray:
    """Expert popularity p (sums to 1): uniform, or zipf(s=1) over the expert index."""
    if routing == "uniform":
        p = np.ones(experts)
    elif routing in ("zipf1", "zipf"):
        p = 1.0 / np.arange(1, experts + 1, dtype=np.float64)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    return p / p.sum()


def group_counts(groups: int, tokens: int, distribution: str, seed: int) -> list[int]:
    """Rows per group: multinomial(tokens, popularity) or all rows in group 0 ('single')."""
    if distribution == "single":
        return [tokens] + [0] * (groups - 1)
    rng = np.random.default_rng(seed)
    return [int(c) for c in rng.multinomial(tokens, popularity(groups, distribution))]


# --------------------------------------------------------------------------- grouped_mm


def grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a[rows,K]`` times per-group ``b_t[G,K,N]``; offs = int32 cumulative end rows."""
    return torch._grouped_mm(a, b_t, offs=offs)


def _probe_case(dev: torch.device, dtype: torch.dtype, counts: list[int]) -> bool:
    g = _gen(dev, 1234)
    k, n = 64, 48
    x = _randn((sum(counts), k), dev, dtype, g)
    w = _randn((len(counts), n, k), dev, dtype, g)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=dev)
    out = grouped_mm(x, w.transpose(-2, -1), offs)
    ref = torch.empty_like(out, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        ref[start : start + c] = x[start : start + c].float() @ w[e].float().t()
        start += c
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return bool(torch.isfinite(out).all()) and _rel_err(out.float(), ref) < 2e-2


def probe_grouped_mm(dev: torch.device, dtype: torch.dtype) -> tuple[bool, int | None, str]:
    """(works, row alignment of group offsets it needs, note) for torch._grouped_mm."""
    if not hasattr(torch, "_grouped_mm"):
        return False, None, "torch has no _grouped_mm"
    try:
        if _probe_case(dev, dtype, [3, 0, 17, 5, 1]):
            return True, 1, "unaligned offsets ok"
        note = "unaligned offsets gave wrong results"
    except RuntimeError as exc:
        note = f"unaligned offsets failed: {str(exc)[:200]}"
    try:
        if _probe_case(dev, dtype, [16, 0, 32, 16, 48]):
            return True, 16, note
    except RuntimeError as exc:
        return False, None, f"{note}; aligned failed: {str(exc)[:200]}"
    return False, None, f"{note}; aligned gave wrong results"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LayerSpec:
    name: str
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    activation: str
    shared_experts: int = 0
    shared_d_ff: int = 0

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def n_mats(self) -> int:
        return 3 if self.gated else 2

    def expert_weight_bytes(self, elem: int = 2) -> int:
        return self.experts * self.n_mats * self.d_model * self.d_ff * elem

    def weight_bytes(self, elem: int = 2) -> int:
        shared = self.shared_experts * self.shared_d_ff * self.n_mats * self.d_model
        return self.expert_weight_bytes(elem) + (shared + self.d_model * self.experts) * elem

    def tiny(self) -> LayerSpec:
        """Same structure at toy size, for CPU tests."""
        experts = min(self.experts, 16)
        ratio = max(1, round(self.shared_d_ff / self.d_ff)) if self.shared_experts else 0
        return replace(
            self,
            d_model=64,
            d_ff=32,
            experts=experts,
            top_k=min(self.top_k, experts),
            shared_d_ff=32 * ratio,
        )


def load_models(path: str | Path | None = None) -> dict[str, LayerSpec]:
    """MoE-layer shapes of every preset of moesim's model catalog (models.yaml)."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "torch_bench reads the model catalog with PyYAML, which is not installed here: "
            "`pip install pyyaml`, or run only --only gemm,grouped,memory,launch"
        ) from exc
    with open(path or CATALOG) as fh:
        raw = yaml.safe_load(fh)
    specs = {}
    for name, m in raw.items():
        shared = int(m.get("shared_experts") or 0)
        specs[name] = LayerSpec(
            name=name,
            d_model=int(m["d_model"]),
            d_ff=int(m["expert_d_ff"]),
            experts=int(m["experts"]),
            top_k=int(m["top_k"]),
            activation=str(m.get("activation", "swiglu")),
            shared_experts=shared,
            shared_d_ff=int(m.get("shared_expert_d_ff") or m["expert_d_ff"]) if shared else 0,
        )
    return specs


def gemm_shapes(specs: Sequence[LayerSpec]) -> list[tuple[int, int]]:
    """Deduplicated (K, N) pairs: up, down, fused gated up, router."""
    pairs: list[tuple[int, int]] = []
    for s in specs:
        cand = [(s.d_model, s.d_ff), (s.d_ff, s.d_model)]
        if s.gated:
            cand.append((s.d_model, 2 * s.d_ff))
        cand.append((s.d_model, s.experts))
        for p in cand:
            if p not in pairs:
                pairs.append(p)
    return pairs


# --------------------------------------------------------------------------- MoE layer


@dataclass
class Perm:
    xs: torch.Tensor  # token rows in expert order (padded per expert when dest is set)
    order: torch.Tensor  # sorted slot -> flat slot (token * k + j)
    token_idx: torch.Tensor  # sorted slot -> token
    offs: torch.Tensor  # int32 cumulative end rows per expert (of xs)
    ends: torch.Tensor  # int32 cumulative end rows per expert, unpadded
    dest: torch.Tensor | None = None  # sorted slot -> row of the padded xs


class MoELayer:
    """One MoE layer with random weights, forward only.

    Weights use the ``nn.Linear`` layout ``[out, in]``: w_up ``[E, 2*d_ff or d_ff, d_model]``
    (gate then up for gated activations), w_down ``[E, d_model, d_ff]``.
    """

    def __init__(
        self,
        spec: LayerSpec,
        dev: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        align: int = 1,
    ) -> None:
        self.spec, self.dev, self.dtype, self.align = spec, dev, dtype, align
        g = _gen(dev, seed)
        d, f, e = spec.d_model, spec.d_ff, spec.experts
        n_up = 2 * f if spec.gated else f
        self.w_router = _randn((d, e), dev, dtype, g, WEIGHT_STD)
        self.w_up = _randn((e, n_up, d), dev, dtype, g, WEIGHT_STD)
        self.w_down = _randn((e, d, f), dev, dtype, g, WEIGHT_STD)
        self.act = _act(spec.activation)
        self.expert_ids = torch.arange(e, device=dev)
        fs = spec.shared_experts * spec.shared_d_ff
        self.ws_up = self.ws_down = None
        if fs:
            self.ws_up = _randn((2 * fs if spec.gated else fs, d), dev, dtype, g, WEIGHT_STD)
            self.ws_down = _randn((d, fs), dev, dtype, g, WEIGHT_STD)

    # -- routing input ---------------------------------------------------------------
    def routing_bias(self, tokens: int, routing: str, seed: int) -> torch.Tensor:
        """float32 [T, E]: log p + Gumbel noise from a seeded CPU generator."""
        g = torch.Generator()
        g.manual_seed(seed)
        u = torch.rand((tokens, self.spec.experts), generator=g, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-12)))
        logp = torch.from_numpy(np.log(popularity(self.spec.experts, routing)))
        return (gumbel + logp).float().to(self.dev)

    def inputs(self, tokens: int, seed: int) -> torch.Tensor:
        return _randn((tokens, self.spec.d_model), self.dev, self.dtype, _gen(self.dev, seed + 1))

    # -- stages -------------------------------------------------------------------------
    def _ffn(self, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        h = x @ w_up.t()
        a = self._activate(h)
        return a @ w_down.t()

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.spec.gated:
            f = h.shape[-1] // 2
            return self.act(h[:, :f]) * h[:, f:]
        return self.act(h)

    def router(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (x @ self.w_router).float() * ROUTER_SCALE + bias
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), ids

    def permute(self, x: torch.Tensor, ids: torch.Tensor, pad: bool = False) -> Perm:
        k = self.spec.top_k
        sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
        token_idx = order // k
        xs = x.index_select(0, token_idx)
        ends = torch.searchsorted(sorted_ids, self.expert_ids, right=True, out_int32=True)
        if not (pad and self.align > 1):
            return Perm(xs, order, token_idx, ends, ends)
        a = self.align
        ends64 = ends.long()
        counts = torch.diff(ends64, prepend=ends64.new_zeros(1))
        padded = (counts + a - 1) // a * a
        pends = torch.cumsum(padded, 0)
        n = xs.shape[0]
        slot = torch.arange(n, device=x.device)
        dest = (pends - padded)[sorted_ids] + slot - (ends64 - counts)[sorted_ids]
        buf = x.new_zeros((n + self.spec.experts * (a - 1), x.shape[1]))
        buf.index_copy_(0, dest, xs)
        return Perm(buf, order, token_idx, pends.to(torch.int32), ends, dest)

    def experts_grouped(self, perm: Perm) -> torch.Tensor:
        h = grouped_mm(perm.xs, self.w_up.transpose(-2, -1), perm.offs)
        out = grouped_mm(self._activate(h), self.w_down.transpose(-2, -1), perm.offs)
        return out if perm.dest is None else out.index_select(0, perm.dest)

    def experts_loop(self, perm: Perm) -> torch.Tensor:
        """Per-expert loop over contiguous row blocks; reads the counts on the host (HF style)."""
        ends = perm.ends.tolist()
        out = perm.xs.new_empty((perm.xs.shape[0], self.spec.d_model))
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                a = self._activate(perm.xs[start:end] @ self.w_up[e].t())
                torch.mm(a, self.w_down[e].t(), out=out[start:end])
            start = end
        return out

    def combine(self, ys: torch.Tensor, w: torch.Tensor, perm: Perm, tokens: int) -> torch.Tensor:
        ws = w.reshape(-1).index_select(0, perm.order).unsqueeze(-1)
        y = torch.zeros((tokens, self.spec.d_model), device=ys.device, dtype=ys.dtype)
        return y.index_add_(0, perm.token_idx, ys * ws)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.ws_up is None:
            return None
        return self._ffn(x, self.ws_up, self.ws_down)

    def experts(self, perm: Perm, impl: str) -> torch.Tensor:
        return self.experts_grouped(perm) if impl == "grouped_mm" else self.experts_loop(perm)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, impl: str) -> torch.Tensor:
        w, ids = self.router(x, bias)
        perm = self.permute(x, ids, pad=impl == "grouped_mm")
        y = self.combine(self.experts(perm, impl), w, perm, x.shape[0])
        s = self.shared(x)
        return y if s is None else y + s

    def reference(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Dense float32: every expert on every token, masked and weighted by the routing."""
        xf = x.float()
        gate = torch.zeros((x.shape[0], self.spec.experts), device=x.device)
        gate.scatter_add_(1, ids, w.float())
        y = torch.zeros((x.shape[0], self.spec.d_model), device=x.device)
        for e in range(self.spec.experts):
            ye = self._ffn(xf, self.w_up[e].float(), self.w_down[e].float())
            y += gate[:, e : e + 1] * ye
        if self.ws_up is not None and self.ws_down is not None:
            y += self._ffn(xf, self.ws_up.float(), self.ws_down.float())
        return y


def check_layer(
    layer: MoELayer, impls: Sequence[str], tokens: int = CHECK_TOKENS, seed: int = 0
) -> dict[str, Any]:
    """Relative errors of the layer implementations against the dense float32 reference."""
    routing = "zipf1"  # skewed: leaves some experts empty, which the kernels must handle
    x = layer.inputs(tokens, seed + 7)
    bias = layer.routing_bias(tokens, routing, seed + 7)
    w, ids = layer.router(x, bias)
    ref = layer.reference(x, w, ids)
    outs: dict[str, torch.Tensor] = {}
    for impl in impls:
        perm = layer.permute(x, ids, pad=impl == "grouped_mm")
        y = layer.combine(layer.experts(perm, impl), w, perm, tokens)
        s = layer.shared(x)
        outs[impl] = (y if s is None else y + s).float()
    errs: dict[str, float | None] = {
        f"rel_err_{impl}": _rel_err(outs[impl], ref) if impl in outs else None
        for impl in ("grouped_mm", "loop")
    }
    errs["rel_err_grouped_vs_loop"] = (
        _rel_err(outs["grouped_mm"], outs["loop"]) if len(outs) == 2 else None
    )
    finite = all(bool(torch.isfinite(o).all()) for o in outs.values())
    measured = [v for v in errs.values() if v is not None]
    ok = finite and all(v < CHECK_TOL for v in measured)
    return {
        "model": layer.spec.name,
        "tokens": tokens,
        "routing": routing,
        "seed": seed + 7,
        "dtype": DTYPE_NAMES.get(layer.dtype, str(layer.dtype)),
        "impls": list(outs),
        **errs,
        "tol": CHECK_TOL,
        "ok": ok,
    }


# --------------------------------------------------------------------------- sections
