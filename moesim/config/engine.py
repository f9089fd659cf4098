"""A serving engine as a preset: its scheduler's defaults and the host-side cost of each
iteration, measured on a real engine (``moesim/catalog/data/engines.yaml``).

Real engines spend a large share of an iteration on the host: Python dispatch of every
layer's kernels, scheduling, input preparation, sampling and cache bookkeeping. moesim's
device cost model prices the kernels; an engine preset adds that host time, fitted on the
engine's own iterations (``moesim calibrate --from`` on ``torch_serving`` records), and sets
the defaults the engine runs with (its scheduler, eager launches or CUDA graphs, the expert
kernel). The ``ideal`` engine has no host cost: a kernel-bound lower bound, moesim's
behaviour before engines were presets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.profile import FitQuality


class HostCost(Frozen):
    """Host-side time of one iteration of one data-parallel rank, microseconds:
    ``fixed_us + per_layer_us x layers + per_sequence_us x sequences + per_token_us x
    tokens + per_kv_token_us x kv tokens + per_prompt_layer_us x prompts x layers``, where
    sequences are those that sample a token this iteration, kv tokens those whose KV the
    batch's attention reads and prompts those it prefills (a chunk of one); plus
    ``first_prompt_length_us`` per prompt length new to the engine process."""

    fixed_us: float = Field(default=0.0, ge=0)
    """Per iteration: scheduling, input preparation, output handling."""
    per_layer_us: float = Field(default=0.0, ge=0)
    """Per decoder layer: dispatching its kernels from Python (eager engines)."""
    per_sequence_us: float = Field(default=0.0, ge=0)
    """Per sequence that samples a token: logits processing, sampling, bookkeeping."""
    per_token_us: float = Field(default=0.0, ge=0)
    """Per new token in the batch: input preparation."""
    per_kv_token_us: float = Field(default=0.0, ge=0)
    """Per cached token the batch's attention reads: engines that build the cache-read
    index of every KV token on the host each iteration (transformers' paged attention
    lists them in Python)."""
    per_prompt_layer_us: float = Field(default=0.0, ge=0)
    """Per prompt an iteration prefills, per decoder layer: engines that run each prompt's
    attention and cache writes as their own kernels (one SDPA call per prompt and layer,
    dispatched from Python: the lean engine's eager steps); 0 where prompts share one
    kernel (transformers' packed attention, varlen flash attention)."""
    first_prompt_length_us: float = Field(default=0.0, ge=0)
    """Once per prompt (or chunk) length the engine process has not run before (the
    attention kernel's set-up for a new shape, e.g. a cuDNN plan; the lean engine's eager
    steps); the lengths its warm-up ran are ``EngineConfig.warm_prompt_lengths``."""
    overlap: bool = False
    """Whether the host prepares the next iteration while the device runs this one (then
    an iteration takes max(host, device), else host + device)."""
    graph_decode: bool = False
    """Decode-only iterations replay captured CUDA graphs (no Python dispatch of their
    kernels), iterations that carry prompt tokens run eagerly: ``per_layer_us`` is then
    paid only by the latter (an engine that graphs every step has it 0)."""

    @property
    def zero(self) -> bool:
        """No host cost at all (the ideal engine)."""
        return not (
            self.fixed_us
            or self.per_layer_us
            or self.per_sequence_us
            or self.per_token_us
            or self.per_kv_token_us
            or self.per_prompt_layer_us
            or self.first_prompt_length_us
        )


class EngineConfig(Frozen):
    """A serving engine: scheduler defaults, host cost, launch and expert kernel defaults."""

    name: str = "ideal"
    source: str = "moesim: no host cost (a kernel-bound lower bound)"
    version: str | None = None
    """The engine and version the preset was measured on (e.g. transformers 5.17.0)."""
    scheduler: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Scheduler defaults (``workload.scheduler`` fields); the scenario's own scheduler
    fields override them (the loader merges them into ``workload.scheduler``)."""
    launch: Literal["eager", "graph"] | None = None
    """Kernel launch mode the engine uses (``cluster.launch`` default); None: the cluster's."""
    expert_kernel: Literal["grouped", "loop"] | None = None
    """Expert kernel the engine uses (``cluster.expert_kernel`` default); None: the cluster's."""
    attention: Literal["fused", "packed"] = "fused"
    """How attention runs over a batch: one fused causal kernel skipping masked blocks
    (FlashAttention, vLLM), or the batch packed as one sequence under a block-diagonal mask
    with every request's KV gathered and repeated per head (transformers' paged SDPA);
    see :meth:`moesim.cost.attention.AttentionCost.scores_s`."""
    host: HostCost = HostCost()
    """The host-side cost of each iteration."""
    output_lag_iterations: int = Field(default=0, ge=0)
    """Iterations between the one that computes a token and the end of the one at which
    that token reaches the host (its time in the request records): 0 for a synchronous
    loop; 1 for a pipelined loop that launches step k+1 before reading step k's tokens
    (transformers' async batching). Where no iteration follows at once (the engine idles),
    the lagged iteration is taken to last as long as the one that computed the token (the
    engine re-runs the same requests before it learns they finished)."""
    warm_prompt_lengths: tuple[int, ...] = ()
    """Prompt (chunk) lengths the engine process ran before the scenario starts (its
    warm-up, earlier runs): they pay no ``host.first_prompt_length_us``."""
    fit: FitQuality | None = None
    """How well the host cost plus the device model reproduce the engine's measured
    iterations (those it was fitted on)."""
    measured_on: tuple[str, ...] = ()
    """``device/model`` pairs the preset was measured on; elsewhere it is extrapolated (said
    in the summary's notes)."""
