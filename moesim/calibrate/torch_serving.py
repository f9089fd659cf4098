"""Serving through Hugging Face transformers' continuous batching on one GPU, measured.

A Mixtral-shaped model with random bf16 weights (built from its config on the GPU; nothing is
downloaded) is served by transformers' own continuous-batching engine
(``model.init_continuous_batching()``, its DEFAULT ``ContinuousBatchingConfig``), and the
engine's own per-token timestamps are written as JSON lines (one record a line, each with a
``kind``, the file written as it goes so a timeout keeps what was measured):

- ``env``: versions, GPU, model config, the engine's resolved configuration (block size,
  blocks, max batch tokens, scheduler, attention and experts implementations, graphs, ...);
- ``serving_prefill``: one request alone, prompt P, 2 output tokens: time to first token;
- ``serving_decode``: B requests of context C submitted at once, T output tokens each: the
  step time once all B decode (median inter-token time in that window), the wall time and
  every engine step (time, tokens emitted), so the mixed ramp can be replayed; combinations
  that do not fit the KV cache are written with ``skipped``;
- ``serving_mixed``: B decoding requests, then one P-token prompt injected: the step that
  carries the prefill next to the B decodes, and the decode steps around it;
- ``serving_request`` / ``serving_run``: online runs, Poisson arrivals from a seeded
  generator submitted by a thread at their times to the running engine: per request
  arrival, first-token and last-token times (seconds from the run start, the engine's own
  clock), token counts; per run the rate, seed, lengths and wall time. Two runs use another
  prompt-length distribution and other seeds (``held_out``), for checks not used in fits.

Imports only the standard library, torch and transformers (so it runs on a bare GPU host):

    python3 -m moesim.calibrate.torch_serving --out serving.jsonl [--quick]

``--quick`` serves a 2-layer Mixtral-shaped model through every code path in under a minute.

What the engine does (transformers 5.17.0, read in the released wheel:
``generation/continuous_batching/{continuous_api,scheduler,cache,cache_manager,initialization,
input_outputs,model_runner,requests,offloading_manager}.py``, ``generation/configuration_utils.py``
(``ContinuousBatchingConfig``), ``integrations/sdpa_paged.py``, ``integrations/moe.py``,
``modeling_utils.py``, ``models/mixtral``):

- API. ``model.init_continuous_batching(generation_config=None,
  continuous_batching_config=None, workload_hints=None)`` returns a
  ``ContinuousBatchingManager``; ``warmup()`` builds the batch processor (KV cache, static
  tensors) and only captures CUDA graphs / compiles when padding is on (not by default, so it
  is otherwise a no-op); ``start()`` runs the loop in a background thread;
  ``add_request(input_ids, request_id=None, max_new_tokens=None, streaming=False,
  record_timestamps=False, eos_token_id=None)`` queues a ``RequestState``;
  ``get_result(request_id=None, timeout=None)`` pops a ``GenerationOutput`` (non-streaming:
  one, when finished); ``cancel_request(id)``; ``stop(block, timeout, keep_for_next_session,
  hard_stop)`` (a plain stop flushes: it waits for pending requests); ``destroy()``.
  ``generate_batch`` wraps the same, passing workload hints (only ``max_requests_per_batch``
  = min(requests, 1024) and the decode-fast-path block table depend on them).
- Length. A request ends at ``max_new_tokens`` generated tokens or at a token in its EOS set;
  negative EOS ids are dropped, so ``eos_token_id=-1`` per request forces exactly
  ``max_new_tokens`` (the harness does this; ``min_new_tokens`` would add a logits processor,
  which lowers the memory fraction to 0.8 and adds per-step work). Decoding is argmax (the
  model's generation config leaves ``do_sample`` unset), logits fp32 at one position per
  request (``logits_to_keep``).
- Clock. Everything is ``time.perf_counter()`` of the one process: ``created_time`` when
  ``add_request`` builds the state (the caller's thread: arrival), ``lifespan[0]`` when first
  scheduled, ``timestamps[i]`` when token i is appended in ``update_batch``, i.e. after that
  step's forward finished and its tokens reached the host (a token's time closes a whole
  iteration: schedule, host input preparation, forward, sync, update). TTFT = timestamps[0] -
  created_time. A soft-reset (preempted) request is re-created: its earlier timestamps and
  created_time are lost (the harness flags ``timestamps_complete``).
- Loop (synchronous by default). Per iteration: drain the input queue, schedule, build inputs
  on the host (Python lists of ids, positions, cumulative lengths and a cache read index of
  every KV token of every scheduled request, then ``torch.tensor`` copies), forward once over
  all scheduled tokens packed as one sequence, argmax, synchronize, update each request (the
  prefix-sharing bookkeeping hashes each completed 256-token block). Host and device do not
  overlap (``use_async_batching`` resolves to False). Idle, the loop waits up to 0.1 s on an
  event that ``add_request`` sets.
- Defaults, resolved (``initialization.py``): ``block_size`` 256; ``max_memory_percent`` 0.9
  of the free memory after the model is loaded (0.8 with logits processors);
  ``max_batch_tokens`` M = min(8192, a VRAM bound with each batch 10% of the cache), at least
  256 (8192 for Mixtral-8x7B on an H200); ``num_blocks`` then solves the memory polynomial
  (KV: 2 x layers x kv_heads x head_dim x 2 B per token, 128 KiB for Mixtral; plus, for paged
  SDPA, a static additive attention mask [M, pages + M] in bf16, i.e. 2 x M bytes = 16 KiB
  per cache token); ``max_requests_per_batch`` 1024 without hints, capped at M;
  ``scheduler_type`` "fifo" (``safety_margin`` 0.15; "prefill_first" has 0.0);
  ``allow_block_sharing`` True (prefix caching on for full-attention models such as Mixtral
  with ``sliding_window`` None); ``cpu_offload_space`` 0 (no CPU swap); ``max_queue_size`` 0;
  ``default_compile_level`` 0 (no torch.compile). CUDA graphs: (varlen, decode) = (not
  mask_needed, same); paged SDPA needs a mask, so (False, False). The decode fast path
  (``flash_attn_with_kvcache`` with a block table) exists only for paged flash attention 2/3:
  ``max_blocks_per_request`` resolves to 0 under SDPA.
- Attention. ``switch_to_cb_friendly_attn`` turns the model's "sdpa" into "paged|sdpa" unless
  flash attention is importable (``flash_attn_interface`` FA3, ``flash_attn`` >= 2.3.3, or the
  ``kernels`` hub fallback), in which case it picks "paged|flash_attention_N", and then the
  decode fast path, CUDA graphs and async batching all turn on by default: a different engine
  (the ``env`` record says which one ran). Paged SDPA per layer: write the new K/V at their
  cache slots (``index_copy_``); if any scheduled request has past KV, ``index_select`` every
  KV token of every scheduled request, ``repeat_kv`` to all query heads (a copy), then ONE
  ``scaled_dot_product_attention`` over [q_total x kv_total] with the block-diagonal causal
  mask. Attention work and memory therefore scale with q_total x kv_total of the whole batch:
  a decode step of B sequences at context C computes B x B.C masked scores, a step with a
  P-token prefill chunk and B decodes (P+B) x (P + B.C). The mask region used is refilled each
  step and built per request (torch.full + triu + copy: three device ops a request).
- Experts: ``experts_implementation`` defaults to "grouped_mm" (torch grouped GEMM over the
  tokens sorted by expert), "eager" (a loop over hit experts) if that cannot dispatch.
  Router: softmax, top-2, renormalised.
- Scheduler (``FIFOScheduler.schedule_batch``, budgets: M tokens, the cache's pages of KV read,
  ``max_requests_per_batch`` requests). Candidates in order: active decoding requests, then
  partially prefilled ones, then waiting requests in arrival order (unless new requests are
  blocked). Each candidate: if free blocks < 15% of all and something is already scheduled,
  stop unless it is decoding (no new prefill once the cache is 85% full); its tokens this step
  = min(remaining, token budget left); blocks are allocated on demand for those tokens only
  ((len - free slots + 1) // 256 + 1 blocks; nothing reserved for future output); a failed
  allocation skips it (and stops the loop if no block is free and it is waiting). A prompt
  that fits the budget left is prefilled whole, else a chunk of exactly the budget left
  (chunked prefill). So prefill and decode mix in one step: all decodes first (one token
  each), then prompt tokens in FIFO order fill the rest of M, several prompts per step if
  they fit. Stop when the token or request budget is spent.
- Preemption. If nothing can be scheduled for lack of blocks, or active requests starved of a
  new block, ``OffloadingManager.offload_requests`` evicts starved requests newest first until
  the rest fit (never the last active one). With no CPU swap each victim is soft-reset: prompt
  + generated tokens become a new prompt queued at the back, re-prefilled later; new requests
  stay blocked until some request finishes. Finished requests free their blocks at once
  (complete blocks keep their hash for prefix reuse until reclaimed). Prompts here are random
  token ids, so no prefix is ever shared.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TextIO

_T0 = time.perf_counter()

ENGINE = "hf-transformers"
FIRST_TOKEN_ID = 3  # Mixtral's ids 0..2 are unk, bos, eos
NO_EOS = -1  # per-request EOS id that the engine drops: every request runs to max_new_tokens

MIXTRAL_8X7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
}
QUICK_OVERRIDES: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}

PREFILL_SIZES = (16, 64, 256, 1024, 2048, 4096, 8192)
DECODE_CONTEXTS = (128, 1024, 4096, 8192)
DECODE_BATCHES = (1, 4, 16, 64, 128, 256)
# (context, batch) in the order measured: a coarse cover of the grid first (the online runs'
# ~1k context leading), then the points between; the rest of the grid after these (most of it
# does not fit the KV cache and is written as skipped)
DECODE_PRIORITY = (
    (1024, 1), (1024, 16), (1024, 64), (128, 1), (128, 64), (128, 256), (4096, 1), (4096, 16),
    (8192, 1), (8192, 4), (1024, 4), (128, 4), (128, 16), (128, 128), (4096, 4), (1024, 128),
    (8192, 16),
)  # fmt: skip
MIXED_BATCHES = (16, 64)
MIXED_PROMPTS = (128, 1024, 4096)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- pure helpers


def model_config(quick: bool) -> dict[str, Any]:
    """The Hugging Face config fields of the served model (Mixtral-8x7B's config.json; a
    2-layer Mixtral-shaped model under ``--quick``)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MIXTRAL_8X7B.items()}
    if quick:
        cfg.update(QUICK_OVERRIDES)
    return cfg


def poisson_arrivals(rng: random.Random, rate_per_s: float, n: int) -> list[float]:
    """n arrival times of a Poisson process of ``rate_per_s``; the first at 0 (the run
    starts with an arrival), then exponential gaps."""
    if rate_per_s <= 0 or n < 0:
        raise ValueError(f"rate {rate_per_s} and count {n} must be positive")
    out: list[float] = []
    t = 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def uniform_lengths(rng: random.Random, lo: int, hi: int, n: int) -> list[int]:
    """n integers uniform in [lo, hi] (both included)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"bad length range {lo}..{hi}")
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """``length`` random token ids, avoiding the special ids below ``FIRST_TOKEN_ID``."""
    return rng.choices(range(FIRST_TOKEN_ID, vocab), k=length)


@dataclass(frozen=True)
class RunSpec:
    """One online run: Poisson arrivals at ``rate_per_s`` of ``requests`` requests with
    prompts uniform in ``prompt_range`` and exactly ``output_tokens`` output tokens."""

    run: str
    rate_per_s: float
    seed: int
    requests: int
    prompt_range: tuple[int, int]
    output_tokens: int
    held_out: bool = False

    def workload(self, vocab: int) -> list[tuple[float, list[int]]]:
        """(arrival time from the run start, prompt ids) per request; fixed by the seed."""
        rng = random.Random(self.seed)
        arrivals = poisson_arrivals(rng, self.rate_per_s, self.requests)
        lengths = uniform_lengths(rng, *self.prompt_range, self.requests)
        return [(a, random_prompt(rng, n, vocab)) for a, n in zip(arrivals, lengths)]


def _count(rate: float, span_s: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rate * span_s)))


CB_OVERRIDES: dict[str, Any] = {}
"""ContinuousBatchingConfig fields set by ``--cb KEY=VALUE`` (a second engine configuration)."""
PLAN = ["default"]
"""The online plan (``--plan``)."""


def init_manager(model: Any) -> Any:
    """The engine's manager: its default configuration, with the ``--cb`` overrides."""
    if not CB_OVERRIDES:
        return model.init_continuous_batching()
    from transformers.generation import ContinuousBatchingConfig

    return model.init_continuous_batching(
        continuous_batching_config=ContinuousBatchingConfig(**CB_OVERRIDES)
    )


def online_plan(quick: bool, seed: int, plan: str = "default") -> list[RunSpec]:
    """The online runs: ~600-token prompts and 128 output tokens at 0.5..4 requests/s and one
    rate past saturation; then held-out runs (100..300-token prompts, 256 output tokens,
    other seeds) at two other rates. ``repeat``: the same shapes again with new seeds (the
    engine's run-to-run variance) and longer runs near saturation (does it keep up?);
    ``short``: four rates and one held-out run (a second engine configuration);
    ``saturation``: 40 s of arrivals at 2, 5.5, 3 and 4 /s (where does it stop keeping
    up?), then the default plan's fitted shapes at 1, 3 and 6 /s with new seeds (this
    host's own speed, in the same process)."""
    if plan == "repeat" and not quick:
        return [
            RunSpec("v2a-p600-o128", 2.0, seed * 1000 + 900, 20, (500, 700), 128, held_out=True),
            RunSpec("v2b-p600-o128", 2.0, seed * 1000 + 901, 20, (500, 700), 128, held_out=True),
            RunSpec("v4a-p600-o128", 4.0, seed * 1000 + 902, 40, (500, 700), 128, held_out=True),
            RunSpec("k1.5-p600-o128", 1.5, seed * 1000 + 910, 60, (500, 700), 128, held_out=True),
            RunSpec("k2.5-p600-o128", 2.5, seed * 1000 + 911, 90, (500, 700), 128, held_out=True),
        ]
    if plan == "saturation" and not quick:
        # 40 s of arrivals at 2..5.5 /s (moesim's hf-transformers-5.17 preset has the
        # requests in flight stop growing at 2 /s and grow with most arrivals from 4 /s:
        # the bracket straddles it), then the default plan's fitted shapes again (1, 3 and
        # 6 /s, new seeds): the host's own speed, measured in the same process
        sat = [
            RunSpec(
                f"z{r:g}-p600-o128", r, seed * 1000 + 950 + i, round(r * 40.0), (500, 700), 128,
                held_out=True,
            )
            for i, r in enumerate((2.0, 5.5, 3.0, 4.0))
        ]  # fmt: skip
        same_host = [
            RunSpec(
                f"c{r:g}-p600-o128", r, seed * 1000 + 970 + i, _count(r, 10.0, 6, 40), (500, 700),
                128,
            )
            for i, r in enumerate((1.0, 3.0, 6.0))
        ]  # fmt: skip
        return sat + same_host
    if plan == "short" and not quick:
        return [
            RunSpec(
                f"s{r:g}-p600-o128",
                r,
                seed * 1000 + 50 + i,
                _count(r, 10.0, 6, 40),
                (500, 700),
                128,
                held_out=r in (2.0,),
            )
            for i, r in enumerate((1.0, 2.0, 4.0, 6.0))
        ] + [RunSpec("sh3.5-p200-o256", 3.5, seed * 1000 + 550, 28, (100, 300), 256, True)]
    if quick:
        return [
            RunSpec("q-r4-p64-o16", 4.0, seed * 1000 + 1, 6, (48, 96), 16),
            RunSpec("q-h8-p32-o24", 8.0, seed * 1000 + 501, 6, (16, 48), 24, held_out=True),
        ]
    main = [
        RunSpec(f"r{r:g}-p600-o128", r, seed * 1000 + i, _count(r, 10.0, 6, 40), (500, 700), 128)
        for i, r in enumerate((0.5, 1.0, 2.0, 3.0, 4.0, 6.0))
    ]
    held = [
        RunSpec(
            f"h{r:g}-p200-o256",
            r,
            seed * 1000 + 500 + i,
            _count(r, 8.0, 6, 40),
            (100, 300),
            256,
            held_out=True,
        )
        for i, r in enumerate((1.5, 3.5))
    ]
    return main + held


def estimate_run_s(spec: RunSpec) -> float:
    """A guess of an online run's duration (arrival span + output at a time per token that
    grows with the rate: ~0.12 s at 0.5/s, ~0.3 s at 6/s), for the time budget only."""
    span = spec.requests / spec.rate_per_s
    return span + spec.output_tokens * (0.10 + 0.035 * spec.rate_per_s) + 3.0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks the engine holds for a sequence of ``tokens`` tokens (its on-demand rule may
    allocate one block ahead, so this is one block more than the exact ceiling)."""
    return (tokens + 1) // block_size + 1


def decode_output_tokens(
    batch: int, context: int, max_batch_tokens: int, base: int = 32, steady: int = 16
) -> int:
    """Output tokens per request for a decode point: ``base``, or more where the prefill ramp
    (B.C prompt tokens at ``max_batch_tokens`` a step) would leave fewer than ``steady``
    steps with all B requests decoding."""
    ramp = math.ceil(batch * context / max_batch_tokens)
    return max(base, ramp + steady)


def decode_fit(
    batch: int,
    context: int,
    output_tokens: int,
    *,
    num_blocks: int,
    block_size: int,
    safety_margin: float,
    max_requests: int,
) -> str | None:
    """Why B requests of ``context`` + ``output_tokens`` tokens cannot all decode at once in
    the engine's cache (None when they can): all must be admitted before free blocks fall
    under the scheduler's safety margin, and the paged-SDPA step copies every KV token of
    the batch to all query heads, outside the engine's memory plan (so the batch's KV is
    kept under half the cache)."""
    if batch > max_requests:
        return f"batch {batch} > max_requests_per_batch {max_requests}"
    need = batch * blocks_for(context + output_tokens, block_size)
    usable = math.floor((1.0 - safety_margin) * num_blocks) - 1
    if need > usable:
        return f"KV cache: needs {need} blocks, {usable} of {num_blocks} admit new prompts"
    if batch * (context + output_tokens) > num_blocks * block_size // 2:
        return "attention transient: KV tokens over half the cache"
    return None


def estimate_decode_s(batch: int, context: int, output_tokens: int, max_batch_tokens: int) -> float:
    """A generous guess of a decode point's duration on full Mixtral (host-bound steps,
    prefill chunks whose masked attention spans the whole batch's KV), for the budget."""
    prompt_total = batch * context
    t, kv = 0.0, 0
    while kv < prompt_total:
        q = min(max_batch_tokens, prompt_total - kv)
        kv += q
        t += 0.08 + 0.6 * q / 8192 + 2.1e-9 * q * kv
    return t + output_tokens * (0.08 + 0.5e-6 * batch * (context + output_tokens / 2))


def decode_grid(quick: bool) -> list[tuple[int, int]]:
    """(context, batch) points in the order they are measured: the priority list, then the
    rest of the grid."""
    if quick:
        return [(c, b) for c in (128, 512) for b in (1, 8)]
    rest = [(c, b) for c in DECODE_CONTEXTS for b in DECODE_BATCHES]
    return list(DECODE_PRIORITY) + [p for p in rest if p not in DECODE_PRIORITY]


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _quantile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (q in [0, 1]) of xs; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _intervals(ts: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(ts)]


def step_tolerance(ts_lists: Sequence[Sequence[float]]) -> float:
    """Seconds within which timestamps of different requests belong to one engine step: a
    third of the median inter-token time (at least 0.2 ms)."""
    gaps = [g for ts in ts_lists for g in _intervals(ts)]
    med = _median(gaps)
    return max(2e-4, (med or 0.0) / 3.0)


def step_clusters(
    ts_lists: Sequence[Sequence[float]], tol: float | None = None
) -> list[tuple[float, int]]:
    """The engine's steps seen through per-token timestamps: (time of the step's last
    timestamp, tokens emitted in it), in time order."""
    tol = step_tolerance(ts_lists) if tol is None else tol
    out: list[tuple[float, int]] = []
    for t in sorted(t for ts in ts_lists for t in ts):
        if out and t - out[-1][0] <= tol:
            out[-1] = (t, out[-1][1] + 1)
        else:
            out.append((t, 1))
    return out


def steady_decode(ts_lists: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Step times once every request decodes: the inter-token intervals that lie between the
    last request's first token and the first request's last token."""
    ts_lists = [ts for ts in ts_lists if ts]
    if not ts_lists:
        return {"step_ms": None, "steady_steps": 0}
    tol = step_tolerance(ts_lists)
    start = max(ts[0] for ts in ts_lists) - tol
    end = min(ts[-1] for ts in ts_lists) + tol
    steady = [
        b - a for ts in ts_lists for a, b in itertools.pairwise(ts) if a >= start and b <= end
    ]
    clusters = step_clusters(ts_lists, tol)
    in_window = [c for c in clusters if start <= c[0] <= end]
    ms = [1e3 * s for s in steady]
    return {
        "step_ms": _median(ms),
        "step_ms_p10": _quantile(ms, 0.1),
        "step_ms_p90": _quantile(ms, 0.9),
        "steady_steps": max(0, len(in_window) - 1),
        "ramp_steps": sum(1 for c in clusters if c[0] < start),
    }


def mixed_step(decode_ts: Sequence[Sequence[float]], t_prefill: float) -> dict[str, Any] | None:
    """The step that emitted a prefill's first token at ``t_prefill`` next to decoding
    requests: its duration seen by each decoding request (token k - token k-1), and the pure
    decode steps just before and after it."""
    tol = step_tolerance(decode_ts)
    mixed, around, position = [], [], []
    for ts in decode_ts:
        hits = [k for k, t in enumerate(ts) if abs(t - t_prefill) <= tol]
        if not hits:
            continue
        k = hits[0]
        if k < 2 or k + 1 >= len(ts):
            continue
        mixed.append(ts[k] - ts[k - 1])
        around += [ts[k - 1] - ts[k - 2], ts[k + 1] - ts[k]]
        position.append(k)
    if not mixed:
        return None
    return {
        "step_ms": 1e3 * statistics.median(mixed),
        "decode_step_ms": 1e3 * statistics.median(around),
        "decoders_seen": len(mixed),
        "decode_token_index": statistics.median(position),
    }


def request_times(
    created: float, started: float, timestamps: Sequence[float], t0: float
) -> dict[str, Any]:
    """A request's times in seconds from ``t0`` (the engine's perf_counter clock)."""

    def rel(t: float | None) -> float | None:
        return None if t is None or t <= 0 else round(t - t0, 6)

    return {
        "arrival_s": rel(created),
        "start_s": rel(started),
        "first_token_s": rel(timestamps[0]) if timestamps else None,
        "finish_s": rel(timestamps[-1]) if timestamps else None,
    }


def summarize_requests(reqs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50s of TTFT, TPOT and end-to-end latency, and output throughput, over completed
    ``serving_request`` records."""
    done = [r for r in reqs if r.get("complete")]
    ttft = [r["first_token_s"] - r["arrival_s"] for r in done]
    e2e = [r["finish_s"] - r["arrival_s"] for r in done]
    tpot = [
        (r["finish_s"] - r["first_token_s"]) / (r["output_tokens"] - 1)
        for r in done
        if r["output_tokens"] > 1
    ]
    out_tokens = sum(r["output_tokens"] for r in done)
    span = max(r["finish_s"] for r in done) - min(r["arrival_s"] for r in done) if done else 0.0
    return {
        "completed": len(done),
        "ttft_p50_s": _median(ttft),
        "tpot_p50_ms": None if not tpot else 1e3 * statistics.median(tpot),
        "e2e_p50_s": _median(e2e),
        "output_tok_per_s": out_tokens / span if span > 0 else None,
    }


def _clean(value: Any) -> Any:
    """JSON-safe copy: tuples to lists, non-finite floats to null, unknown objects to repr."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _clean(getattr(value, f.name)) for f in fields(value)}
    return repr(value)


class Sink:
    """Writes each record as one JSON line at once (flushed), and keeps them."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.records: list[dict[str, Any]] = []

    def write(self, kind: str, **record: Any) -> dict[str, Any]:
        rec = _clean({"kind": kind, **record})
        self.records.append(rec)
        self.stream.write(json.dumps(rec) + "\n")
        self.stream.flush()
        return rec


class Budget:
    """Seconds left of the whole run."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - _T0)


# --------------------------------------------------------------------------- the engine


class EngineDied(RuntimeError):
    pass


class Engine:
    """The running manager, with results gathered from its one output queue."""

    def __init__(self, manager: Any) -> None:
        self.m = manager
        self.done: dict[str, Any] = {}
        self.seen: dict[str, int] = {}  # tokens streamed so far, per streaming request

    def submit(self, rid: str, ids: list[int], max_new: int, streaming: bool = False) -> None:
        got = self.m.add_request(
            input_ids=ids,
            request_id=rid,
            max_new_tokens=max_new,
            streaming=streaming,
            record_timestamps=True,
            eos_token_id=NO_EOS,
        )
        if got is None:
            raise EngineDied(f"the engine refused request {rid}")

    def pump(self, timeout: float) -> None:
        out = self.m.get_result(timeout=timeout)
        if out is None:
            if not self.m.is_running():
                raise EngineDied("the engine's generation thread is not running")
            return
        if out.is_finished():
            self.done[out.request_id] = out
        else:
            self.seen[out.request_id] = len(out.generated_tokens)

    def wait(self, ids: Sequence[str], deadline: float) -> bool:
        """Until every id finished (True) or ``deadline`` (perf_counter) passed (False)."""
        while not all(rid in self.done for rid in ids):
            if time.perf_counter() > deadline:
                return False
            self.pump(0.05)
        return True

    def wait_tokens(self, rid: str, n: int, deadline: float) -> bool:
        while rid not in self.done and self.seen.get(rid, 0) < n:
            if time.perf_counter() > deadline:
                return False
            self.pump(0.02)
        return True

    def cancel(self, ids: Sequence[str]) -> list[str]:
        left = [rid for rid in ids if rid not in self.done]
        for rid in left:
            self.m.cancel_request(rid)
        return left

    def take(self, rid: str) -> Any:
        self.seen.pop(rid, None)
        return self.done.pop(rid)


def _stamps(out: Any) -> list[float]:
    return list(out.timestamps or [])


def _smi() -> str:
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def host_probe(torch: Any = None, repeats: int = 5) -> dict[str, Any]:
    """The host's own speed at what an eager engine's loop does between kernels, median
    of ``repeats``: a Python list of 100,000 ints built and summed (the cache-index lists
    of a paged engine), and, given torch with a GPU, the host time of one tiny kernel
    launch from Python (2,000 in a row, then one synchronisation); with the CPU model."""
    py = []
    for _ in range(repeats):
        t = time.perf_counter()
        sum([i * 3 + 1 for i in range(100_000)])
        py.append(time.perf_counter() - t)
    out: dict[str, Any] = {"python_list_100k_ms": round(statistics.median(py) * 1e3, 3)}
    if torch is not None and torch.cuda.is_available():
        x = torch.zeros(16, device="cuda")
        launch = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(2000):
                x.add_(1.0)
            torch.cuda.synchronize()
            launch.append((time.perf_counter() - t) / 2000)
        out["torch_launch_us"] = round(statistics.median(launch[1:]) * 1e6, 3)
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
            cpu = next(names, cpu)
    except OSError:
        pass
    out.update(cpu_model=cpu, cpu_count=os.cpu_count(), loadavg=list(os.getloadavg()))
    return out


def build_model(cfg: dict[str, Any]) -> Any:
    """The model from its config, bf16, weights created and initialised on the GPU (the
    library's own init: normal(0, 0.02) for linear, embedding, expert and router weights,
    ones for norms; on the GPU this takes seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(**cfg)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    bad = [n for n, p in model.named_parameters() if p.device.type != "cuda"]
    if bad:
        raise RuntimeError(f"parameters off the GPU: {bad[:3]}")
    return model


def _weight_check(model: Any) -> dict[str, Any]:
    import torch

    router = model.model.layers[0].mlp.gate.weight.float()
    experts = model.model.layers[0].mlp.experts.gate_up_proj[0].float()
    return {
        "router_std": float(router.std()),
        "expert_std": float(experts.std()),
        "finite": bool(torch.isfinite(router).all() and torch.isfinite(experts).all()),
    }


def engine_settings(manager: Any, model: Any) -> dict[str, Any]:
    """The engine's configuration as resolved for this model and GPU (after the cache)."""
    cb = manager.continuous_batching_config
    bp = manager.batch_processor
    cache = getattr(bp, "cache", None)
    sched = getattr(bp, "scheduler", None)
    io = getattr(bp, "inputs_and_outputs", None)
    runner = getattr(bp, "model_runner", None)
    mask = getattr(io, "attention_mask", None)
    mask_bytes = (
        sum(t.numel() * t.element_size() for t in mask.values()) if isinstance(mask, dict) else 0
    )
    kv_bytes = (
        sum(t.numel() * t.element_size() for t in (*cache.key_cache, *cache.value_cache))
        if cache is not None
        else None
    )

    def attr(obj: Any, name: str) -> Any:
        return getattr(obj, name, None)

    return {
        "cb_config": {f.name: getattr(cb, f.name) for f in fields(cb)},
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": attr(model.config, "_experts_implementation"),
        "block_size": attr(cache, "block_size"),
        "num_blocks": attr(cache, "num_blocks"),
        "num_pages": attr(cache, "num_pages"),
        "max_batch_tokens": attr(cache, "max_batch_tokens"),
        "max_blocks_per_request": attr(cache, "max_blocks_per_request"),
        "prefix_sharing": attr(cache, "use_prefix_sharing"),
        "scheduler": type(sched).__name__ if sched is not None else None,
        "safety_margin": attr(sched, "safety_margin"),
        "max_requests_per_batch": attr(sched, "max_requests_per_batch"),
        "use_cuda_graph": attr(cb, "use_cuda_graph"),
        "use_async_batching": attr(cb, "use_async_batching"),
        "pad_inputs": attr(runner, "pad_inputs"),
        "do_sample": attr(bp, "do_sample"),
        "logits_processing": attr(manager.logit_processor, "do_processing"),
        "io_class": type(io).__name__ if io is not None else None,
        "attention_mask_bytes": mask_bytes,
        "kv_cache_bytes": kv_bytes,
        "eos": "per request eos_token_id=-1 (every request runs to max_new_tokens)",
    }


def env_record(
    torch: Any, transformers: Any, model: Any, cfg: dict[str, Any], quick: bool, build_s: float
) -> dict[str, Any]:
    import importlib.util

    free, total = torch.cuda.mem_get_info()
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "engine": ENGINE,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0),
        "smi": _smi(),
        "gpu_total_bytes": total,
        "gpu_free_bytes_after_cache": free,
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
        "flash_attn3_importable": importlib.util.find_spec("flash_attn_interface") is not None,
        "kernels_importable": importlib.util.find_spec("kernels") is not None,
        "model": "mixtral-8x7b" if not quick else "mixtral-shaped-2l-quick",
        "model_config": cfg,
        "params": n_params,
        "weights_bytes": 2 * n_params,
        "dtype": "bfloat16",
        "quick": quick,
        "build_s": build_s,
        "clock": "time.perf_counter (the engine's timestamps)",
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- measurements


def measure_prefill(
    engine: Engine,
    sink: Sink,
    rng: random.Random,
    vocab: int,
    sizes: Sequence[int],
    reps: int,
    max_batch_tokens: int,
    deadline: float,
) -> None:
    for p in sizes:
        ttft, queue, decode = [], [], []
        for r in range(reps):
            if time.perf_counter() > deadline:
                break
            rid = f"pre-{p}-{r}"
            engine.submit(rid, random_prompt(rng, p, vocab), 2)
            if not engine.wait([rid], deadline):
                engine.cancel([rid])
                break
            out = engine.take(rid)
            ts = _stamps(out)
            if out.error or not ts:
                sink.write("serving_prefill", prompt_tokens=p, error=out.error or "no timestamps")
                continue
            ttft.append(1e3 * (ts[0] - out.created_time))
            queue.append(1e3 * (out.lifespan[0] - out.created_time))
            if len(ts) > 1:
                decode.append(1e3 * (ts[1] - ts[0]))
        if not ttft:
            sink.write("serving_prefill", prompt_tokens=p, skipped="time budget")
            continue
        sink.write(
            "serving_prefill",
            prompt_tokens=p,
            reps=len(ttft),
            ttft_ms=statistics.median(ttft),
            ttft_ms_all=ttft,
            queue_ms=statistics.median(queue),
            decode_ms=_median(decode),
            chunks=math.ceil(p / max_batch_tokens),
        )
        log(f"prefill P={p}: TTFT {statistics.median(ttft):.1f} ms over {len(ttft)}")


def measure_decode(
    engine: Engine,
    sink: Sink,
    rng: random.Random,
    vocab: int,
    batch: int,
    context: int,
    out_tokens: int,
    deadline: float,
    max_batch_tokens: int,
) -> float | None:
    """Measures one decode point; returns its wall time (None when it did not complete)."""
    ids = [f"dec-b{batch}-c{context}-{i}" for i in range(batch)]
    prompts = [random_prompt(rng, context, vocab) for _ in ids]
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.submit(rid, prompt, out_tokens)
    ok = engine.wait(ids, deadline)
    if not ok:
        engine.cancel(ids)
        for rid in ids:
            engine.done.pop(rid, None)
        sink.write(
            "serving_decode",
            batch=batch,
            context=context,
            output_tokens=out_tokens,
            skipped="time budget (cancelled while running)",
        )
        return None
    outs = [engine.take(rid) for rid in ids]
    errors = [o.error for o in outs if o.error]
    ts = [_stamps(o) for o in outs]
    if errors or not all(ts):
        sink.write(
            "serving_decode",
            batch=batch,
            context=context,
            output_tokens=out_tokens,
            error=(errors or ["no timestamps"])[0],
            errors=len(errors),
        )
        return None
    stats = steady_decode(ts)
    first = min(o.created_time for o in outs)
    steps = step_clusters(ts)
    sink.write(
        "serving_decode",
        batch=batch,
        context=context,
        output_tokens=out_tokens,
        **stats,
        wall_s=max(t[-1] for t in ts) - first,
        submit_s=max(o.created_time for o in outs) - t0,
        ttft_ms_max=1e3 * max(t[0] - o.created_time for t, o in zip(ts, outs)),
        generated_min=min(len(o.generated_tokens) for o in outs),
        timestamps_complete=all(len(t) == out_tokens for t in ts),
        steps=[[round(1e3 * (t - first), 3), n] for t, n in steps],
        max_batch_tokens=max_batch_tokens,
    )
    log(
        f"decode B={batch} C={context} T={out_tokens}: step {stats['step_ms']} ms "
        f"({stats['steady_steps']} steady steps)"
    )
    return time.perf_counter() - t0


def measure_mixed(
    engine: Engine,
    sink: Sink,
    rng: random.Random,
    vocab: int,
    batch: int,
    context: int,
    prompts: Sequence[int],
    max_batch_tokens: int,
    deadline: float,
) -> None:
    ramp = math.ceil(batch * context / max_batch_tokens) + 1
    out_tokens = ramp + 3 + 7 * len(prompts) + 6
    ids = [f"mix-b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.submit(rid, random_prompt(rng, context, vocab), out_tokens, streaming=i == 0)
    injected: list[tuple[str, int]] = []
    target = ramp + 3
    for p in prompts:
        if not engine.wait_tokens(ids[0], target, deadline) or ids[0] in engine.done:
            break
        rid = f"mix-b{batch}-p{p}"
        engine.submit(rid, random_prompt(rng, p, vocab), 1)
        injected.append((rid, p))
        if not engine.wait([rid], deadline):
            break
        target = engine.seen.get(ids[0], 0) + 4
    if not engine.wait(ids + [r for r, _ in injected], deadline):
        engine.cancel(ids + [r for r, _ in injected])
        sink.write("serving_mixed", batch=batch, context=context, skipped="time budget")
        return
    outs = [engine.take(rid) for rid in ids]
    ts = [_stamps(o) for o in outs]
    for rid, p in injected:
        inj = engine.take(rid)
        its = _stamps(inj)
        found = mixed_step(ts, its[0]) if its else None
        rec = {
            "batch": batch,
            "context": context,
            "prefill_tokens": p,
            "ttft_ms": 1e3 * (its[0] - inj.created_time) if its else None,
            "chunks": math.ceil(p / max(1, max_batch_tokens - batch)),
        }
        if found is None:
            sink.write("serving_mixed", **rec, skipped="prefill step not located")
            continue
        sink.write("serving_mixed", **rec, **found)
        log(
            f"mixed B={batch} P={p}: step {found['step_ms']:.1f} ms, "
            f"decode {found['decode_step_ms']:.1f} ms"
        )


def run_online(
    engine: Engine, sink: Sink, spec: RunSpec, vocab: int, deadline: float
) -> dict[str, Any]:
    work = spec.workload(vocab)
    ids = [f"{spec.run}-{i:03d}" for i in range(spec.requests)]
    stop = threading.Event()
    submitted: list[str] = []
    failures: list[str] = []
    t0 = time.perf_counter() + 0.05

    def submitter() -> None:
        for (at, prompt), rid in zip(work, ids):
            delay = t0 + at - time.perf_counter()
            if delay > 0 and stop.wait(delay):
                return
            try:
                engine.submit(rid, prompt, spec.output_tokens)
            except Exception as exc:  # the engine stopped: stop submitting
                failures.append(repr(exc))
                return
            submitted.append(rid)

    thread = threading.Thread(target=submitter, name=f"arrivals-{spec.run}", daemon=True)
    thread.start()
    died: EngineDied | None = None
    try:
        finished = engine.wait(ids, deadline)
    except EngineDied as exc:  # write what finished, then let the section see it
        finished, died = False, exc
    stop.set()
    thread.join(timeout=5)
    cancelled = engine.cancel(list(submitted)) if not finished and died is None else []
    reqs = []
    for i, ((at, prompt), rid) in enumerate(zip(work, ids)):
        out = engine.done.pop(rid, None)
        engine.seen.pop(rid, None)
        rec: dict[str, Any] = {
            "run": spec.run,
            "rate_per_s": spec.rate_per_s,
            "seed": spec.seed,
            "held_out": spec.held_out,
            "index": i,
            "planned_arrival_s": round(at, 6),
            "prompt_tokens": len(prompt),
        }
        if out is None:
            rec.update(
                arrival_s=None,
                first_token_s=None,
                finish_s=None,
                output_tokens=0,
                complete=False,
                submitted=rid in submitted,
            )
        else:
            ts = _stamps(out)
            rec.update(request_times(out.created_time, out.lifespan[0], ts, t0))
            rec.update(
                output_tokens=len(out.generated_tokens),
                complete=not out.error and len(out.generated_tokens) == spec.output_tokens,
                timestamps_complete=len(ts) == len(out.generated_tokens),
                error=out.error,
                token_s=[round(t - t0, 5) for t in ts],
            )
        reqs.append(sink.write("serving_request", **rec))
    summary = summarize_requests(reqs)
    ends = [r["finish_s"] for r in reqs if r.get("finish_s") is not None]
    sink.write(
        "serving_run",
        run=spec.run,
        rate_per_s=spec.rate_per_s,
        seed=spec.seed,
        requests=spec.requests,
        prompt_range=list(spec.prompt_range),
        output_tokens=spec.output_tokens,
        held_out=spec.held_out,
        wall_s=max(ends) if ends else None,
        submitted=len(submitted),
        cancelled=len(cancelled),
        submit_errors=failures[:3],
        **summary,
    )
    if died is not None:
        raise died
    return summary


# --------------------------------------------------------------------------- main


@dataclass
class Ctx:
    """What every section needs."""

    engine: Engine
    sink: Sink
    rng: random.Random
    vocab: int
    settings: dict[str, Any]
    quick: bool
    budget: Budget
    plan: list[RunSpec]
    sections: set[str]
    model: Any = None
    restarts: int = 0

    @property
    def max_batch_tokens(self) -> int:
        return int(self.settings.get("max_batch_tokens") or 8192)

    def online_need(self) -> float:
        """Seconds the online runs are expected to take (kept for them by earlier sections)."""
        if "online" not in self.sections:
            return 0.0
        return 10.0 if self.quick else sum(estimate_run_s(s) for s in self.plan)


def section_warmup(c: Ctx) -> None:
    """First calls of every kernel path (not a measurement)."""
    t = time.perf_counter()
    c.engine.submit("warm-long", random_prompt(c.rng, 256 if c.quick else 2048, c.vocab), 4)
    ids = [f"warm-{i}" for i in range(16)]
    ok = c.engine.wait(["warm-long"], time.perf_counter() + 60)
    for rid in ids:
        c.engine.submit(rid, random_prompt(c.rng, 256, c.vocab), 8)
    if not (c.engine.wait(ids, time.perf_counter() + 60) and ok):
        c.engine.cancel(["warm-long", *ids])
    for rid in ["warm-long", *ids]:
        c.engine.done.pop(rid, None)
    c.sink.write("warmup", wall_s=time.perf_counter() - t)


def section_prefill(c: Ctx) -> None:
    sizes = (16, 256, 1024) if c.quick else PREFILL_SIZES
    reps = 1 if c.quick else 3
    keep = c.online_need() + 70.0  # the decode minimum and the mixed section
    cap = 8.0 if c.quick else max(5.0, min(40.0, c.budget.left() - keep))
    measure_prefill(
        c.engine, c.sink, c.rng, c.vocab, sizes, reps, c.max_batch_tokens, time.perf_counter() + cap
    )


def section_decode(c: Ctx) -> None:
    mixed_need = (8.0 if c.quick else 30.0) if "mixed" in c.sections else 0.0
    cap = c.budget.left() - c.online_need() - mixed_need - 10.0
    cap = 12.0 if c.quick else min(150.0, max(60.0, cap))
    end = time.perf_counter() + cap
    log(f"decode grid: {cap:.0f} s")
    base, steady = (8, 4) if c.quick else (32, 16)
    s = c.settings
    ratios: list[float] = []  # measured / estimated wall time, to correct the estimates
    for ctx_len, b in decode_grid(c.quick):
        t_out = decode_output_tokens(b, ctx_len, c.max_batch_tokens, base, steady)
        why = decode_fit(
            b,
            ctx_len,
            t_out,
            num_blocks=int(s["num_blocks"]),
            block_size=int(s["block_size"]),
            safety_margin=float(s["safety_margin"]),
            max_requests=int(s["max_requests_per_batch"]),
        )
        est = estimate_decode_s(b, ctx_len, t_out, c.max_batch_tokens)
        scaled = 0.0 if c.quick else est * min(2.0, max(0.3, _median(ratios) or 1.0))
        if why is None and time.perf_counter() + scaled > end:
            why = f"time budget (estimated {scaled:.0f} s)"
        if why is not None:
            c.sink.write(
                "serving_decode", batch=b, context=ctx_len, output_tokens=t_out, skipped=why
            )
            log(f"decode B={b} C={ctx_len}: skipped: {why}")
            continue
        wall = measure_decode(
            c.engine,
            c.sink,
            c.rng,
            c.vocab,
            b,
            ctx_len,
            t_out,
            max(end, time.perf_counter() + 5.0),
            c.max_batch_tokens,
        )
        if wall is not None:
            ratios.append(wall / est)


def section_mixed(c: Ctx) -> None:
    cap = 8.0 if c.quick else max(5.0, min(35.0, c.budget.left() - c.online_need() - 5.0))
    end = time.perf_counter() + cap
    for b in (4,) if c.quick else MIXED_BATCHES:
        if time.perf_counter() > end:
            c.sink.write("serving_mixed", batch=b, skipped="time budget")
            continue
        measure_mixed(
            c.engine,
            c.sink,
            c.rng,
            c.vocab,
            b,
            128 if c.quick else 512,
            (64, 512) if c.quick else MIXED_PROMPTS,
            c.max_batch_tokens,
            end,
        )


def section_online(c: Ctx) -> None:
    for spec in c.plan:
        est = 5.0 if c.quick else estimate_run_s(spec)
        left = c.budget.left() - 8.0
        if left < est:
            c.sink.write(
                "serving_run",
                run=spec.run,
                rate_per_s=spec.rate_per_s,
                seed=spec.seed,
                requests=spec.requests,
                prompt_range=list(spec.prompt_range),
                output_tokens=spec.output_tokens,
                held_out=spec.held_out,
                skipped=f"time budget ({left:.0f} s left, estimated {est:.0f} s)",
            )
            log(f"online {spec.run}: skipped (time budget)")
            continue
        log(
            f"online {spec.run}: {spec.requests} requests at {spec.rate_per_s:g}/s, "
            f"prompts {spec.prompt_range}, {spec.output_tokens} out (seed {spec.seed})"
        )
        try:
            s = run_online(c.engine, c.sink, spec, c.vocab, time.perf_counter() + left)
        except EngineDied as exc:  # the run's requests are written; go on with a new engine
            c.sink.write("error", section=f"online {spec.run}", error=repr(exc))
            if c.restarts >= 2 or not restart_engine(c):
                raise
            continue

        def fmt(v: Any, scale: float = 1.0) -> str:
            return "-" if v is None else f"{v * scale:.3g}"

        log(
            f"online {spec.run}: {s['completed']}/{spec.requests} done; TTFT p50 "
            f"{fmt(s['ttft_p50_s'])} s, TPOT p50 {fmt(s['tpot_p50_ms'])} ms, E2E p50 "
            f"{fmt(s['e2e_p50_s'])} s, {fmt(s['output_tok_per_s'])} output tok/s"
        )


def restart_engine(c: Ctx) -> bool:
    """A new manager (same default configuration) after the engine died; True if it runs."""
    c.restarts += 1
    try:
        c.engine.m.stop(block=True, timeout=10, hard_stop=True)
    except Exception as exc:
        log(f"stopping the dead engine: {exc!r}")
    c.engine.m = None  # drop the dead manager (its error's frames hold the old cache)
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
        manager = init_manager(c.model)
        manager.warmup()
        settings = engine_settings(manager, c.model)
        manager.start()
    except Exception as exc:
        c.sink.write("error", section="restart", error=repr(exc))
        log(f"restart failed: {exc!r}")
        return False
    c.engine = Engine(manager)
    c.settings = settings
    c.sink.write("engine_restart", restarts=c.restarts, **settings)
    log(f"engine restarted ({settings['num_blocks']} blocks)")
    return True


SECTIONS = (
    ("prefill", section_prefill),
    ("decode", section_decode),
    ("mixed", section_mixed),
    ("online", section_online),
)


def _section(c: Ctx, name: str, fn: Any, timings: dict[str, float]) -> bool:
    """Runs one section; an error is written as a record. False when the engine died."""
    t = time.perf_counter()
    log(f"== {name} ({c.budget.left():.0f} s of the budget left)")
    try:
        fn(c)
        return True
    except EngineDied as exc:
        c.sink.write("error", section=name, error=repr(exc))
        log(f"{name}: engine died: {exc}")
        return False
    except Exception as exc:
        c.sink.write("error", section=name, error=repr(exc), trace=traceback.format_exc()[-3000:])
        log(f"{name}: {exc!r}")
        return c.engine.m.is_running()
    finally:
        timings[name] = round(time.perf_counter() - t, 2)
        log(f"== {name} took {timings[name]:.1f} s")


def _start(sink: Sink, quick: bool, seed: int, budget: Budget) -> Ctx | None:
    """Imports, the model, the engine (started) and the env record; None on failure."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        sink.write("error", section="import", error=repr(exc))
        log(f"cannot import torch and transformers: {exc}")
        return None
    if not torch.cuda.is_available():
        sink.write("error", section="import", error="no CUDA device")
        log("no CUDA device")
        return None
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name(0)}; budget {budget.total_s:.0f} s"
    )
    if not transformers.__version__.startswith("5.17"):
        log(
            f"WARNING: this harness was written against transformers 5.17, "
            f"not {transformers.__version__}"
        )
    cfg = model_config(quick)
    try:
        t = time.perf_counter()
        model = build_model(cfg)
        build_s = time.perf_counter() - t
        log(f"model built in {build_s:.1f} s")
        manager = init_manager(model)
        manager.warmup()  # builds the cache and static inputs; captures nothing by default
        settings = engine_settings(manager, model)
        plan = online_plan(quick, seed, PLAN[0])
        sink.write(
            "env",
            **env_record(torch, transformers, model, cfg, quick, build_s),
            **settings,
            weights=_weight_check(model),
            host_probe=host_probe(torch),
            online_plan=[spec.__dict__ for spec in plan],
            cb_overrides=dict(CB_OVERRIDES),
            plan=PLAN[0],
            budget_s=budget.total_s,
        )
        manager.start()
    except Exception as exc:
        sink.write("error", section="start", error=repr(exc), trace=traceback.format_exc()[-3000:])
        log(f"start failed: {exc!r}")
        return None
    log(
        f"engine: {settings['attn_implementation']}, experts "
        f"{settings['experts_implementation']}, {settings['num_blocks']} blocks of "
        f"{settings['block_size']}, max_batch_tokens {settings['max_batch_tokens']}, "
        f"{settings['scheduler']} (margin {settings['safety_margin']}), graphs "
        f"{settings['use_cuda_graph']}, async {settings['use_async_batching']}"
    )
    ctx = Ctx(
        engine=Engine(manager),
        sink=sink,
        rng=random.Random(seed),
        vocab=int(cfg["vocab_size"]),
        settings=settings,
        quick=quick,
        budget=budget,
        plan=plan,
        sections=set(),
        model=model,
    )
    return ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines, written as measured")
    ap.add_argument("--quick", action="store_true", help="small model, every path, < 1 min")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="whole-run time budget in seconds (default 530; 90 with --quick)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--cb",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a ContinuousBatchingConfig field (JSON value), e.g. use_async_batching=true",
    )
    ap.add_argument(
        "--plan", choices=["default", "repeat", "short", "saturation"], default="default"
    )
    ap.add_argument(
        "--sections",
        default="prefill,decode,mixed,online",
        help="comma list of: prefill, decode, mixed, online",
    )
    args = ap.parse_args(argv)
    quick = bool(args.quick)
    for item in args.cb:
        key, _, raw = item.partition("=")
        try:
            CB_OVERRIDES[key] = json.loads(raw)
        except ValueError:
            CB_OVERRIDES[key] = raw
    PLAN[0] = args.plan
    budget = Budget(args.budget_s if args.budget_s else (90.0 if quick else 530.0))
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = wanted - {name for name, _ in SECTIONS}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    timings: dict[str, float] = {}
    alive = False
    with open(args.out, "w", encoding="utf-8") as fh:
        sink = Sink(fh)
        started = _start(sink, quick, args.seed, budget)
        if started is None:
            return 2
        ctx = started
        ctx.sections = wanted
        try:
            alive = _section(ctx, "warmup", section_warmup, timings)
            for name, fn in SECTIONS:
                if name not in wanted:
                    continue
                if not alive and ctx.restarts < 2 and ctx.budget.left() > 60:
                    alive = restart_engine(ctx)
                if alive:
                    alive = _section(ctx, name, fn, timings)
        finally:
            try:
                probe: Any = host_probe(sys.modules.get("torch"))
            except Exception as exc:  # a dead GPU must not lose the done record
                probe = repr(exc)
            sink.write(
                "done",
                host_probe=probe,
                elapsed_s=time.perf_counter() - _T0,
                sections=timings,
                engine_alive=alive,
                restarts=ctx.restarts,
            )
            log(f"done in {time.perf_counter() - _T0:.1f} s: {timings}")
            manager = ctx.engine.m
            if manager is not None:
                manager.stop(block=True, timeout=30, hard_stop=True)
    if manager is not None and manager.is_running():  # a stuck thread must not hang the exit
        log("the generation thread is still running: exiting hard")
        sys.stdout.flush()
        os._exit(0 if alive else 1)
    return 0 if alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
