"""Typed schema of a Mixture-of-Experts model: the shapes moesim needs to count work and bytes.

A ``ModelConfig`` is pure architecture data taken from a published ``config.json`` or paper
table, with its citations. It holds no derived figures; parameter counts, FLOPs and bytes are
computed from it by ``moesim.derived.model_figures``.

Layer numbering. Layers are numbered ``0 .. layers-1``. For an encoder-decoder model the
encoder blocks come first (``0 .. encoder_layers-1``) and the decoder blocks follow. Within
each stack (the encoder, the decoder, or the single decoder-only stack) a block with local
index ``j`` is a MoE block when ``j >= first_dense_layers`` and
``(j - first_dense_layers + 1) % moe_layer_frequency == 0``; every other block has a dense
FFN of width ``dense_d_ff``. With ``moe_layer_frequency=2`` this makes blocks 1, 3, 5, ...
MoE, as Hugging Face ``SwitchTransformers`` (``sparse_step``) and ``Qwen2Moe``
(``decoder_sparse_step``) do; with ``first_dense_layers=k`` and frequency 1 it is DeepSeek's
``first_k_dense_replace``.

Deliberately not modelled (each below 0.01% of any preset's parameters): relative position
bias tables (T5/Switch, GLaM), rotary embeddings (no parameters), biases of layer norms
unless ``norm_bias`` is set, and FFN biases (none of the presets has them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator, model_validator

from moesim.config.base import Frozen
from moesim.units import BYTES_PER_ELEMENT

Activation = Literal["swiglu", "geglu", "gelu", "relu"]
"""FFN activation: the gated ones (swiglu, geglu) use three matrices, the others two."""

_GATED: frozenset[str] = frozenset({"swiglu", "geglu"})


class ModelConfig(Frozen):
    """One MoE model's architecture, as published, with per-field citations."""

    name: str = Field(min_length=1)
    """Preset name, e.g. ``mixtral-8x7b`` (filled from the catalog key)."""
    source: str = Field(min_length=1)
    """Citation of the config file, model card or paper table the values come from."""
    sources: dict[str, str] = Field(default_factory=dict)
    """Per-field citations where a field comes from elsewhere than ``source``: field -> citation."""

    # --- overall shape -------------------------------------------------------------------
    architecture: Literal["decoder", "encoder_decoder"] = "decoder"
    """Decoder-only language model, or encoder-decoder (T5-style: decoder has cross-attention)."""
    layers: int = Field(ge=1)
    """Transformer blocks in total, count (encoder-decoder: encoder + decoder blocks)."""
    encoder_layers: int = Field(default=0, ge=0)
    """Encoder blocks among ``layers``, count; 0 for decoder-only models."""
    d_model: int = Field(ge=1)
    """Hidden (residual stream) width, elements."""
    vocab_size: int = Field(ge=1)
    """Vocabulary size of the embedding table and output head, tokens."""
    tied_embeddings: bool
    """Whether the output head shares the input embedding matrix (counted once if so)."""
    dtype: Literal["bf16", "fp16", "fp32", "fp8"] = "bf16"
    """Storage type of the weights as served; sets bytes per parameter."""
    norm_bias: bool = False
    """Whether each norm has a bias vector as well as a scale (LayerNorm with bias)."""

    # --- experts -------------------------------------------------------------------------
    experts: int = Field(ge=1)
    """Routed experts per MoE layer, count."""
    top_k: int = Field(ge=1)
    """Routed experts each token is sent to per MoE layer, count."""
    expert_d_ff: int = Field(ge=1)
    """Hidden width of one routed expert's FFN, elements."""
    shared_experts: int = Field(default=0, ge=0)
    """Always-active shared experts per MoE layer, count."""
    shared_expert_d_ff: int | None = Field(default=None, ge=1)
    """Hidden width of one shared expert, elements; None means ``expert_d_ff``."""
    shared_expert_gate: bool = False
    """Whether the shared expert output is scaled by a learned sigmoid gate (d_model x 1)."""
    activation: Activation
    """Activation of routed and shared experts; gated kinds have 3 matrices, others 2."""
    dense_activation: Activation | None = None
    """Activation of the dense (non-MoE) FFNs; None means the same as ``activation``."""
    dense_d_ff: int | None = Field(default=None, ge=1)
    """Hidden width of the FFN in non-MoE blocks, elements; None if every block is MoE."""
    moe_layer_frequency: int = Field(default=1, ge=1)
    """Every n-th block (after the first dense ones) of each stack is a MoE block, n."""
    first_dense_layers: int = Field(default=0, ge=0)
    """Leading blocks of each stack kept dense (DeepSeek ``first_k_dense_replace``), count."""

    # --- router --------------------------------------------------------------------------
    router: Literal["softmax", "sigmoid"] = "softmax"
    """Gate scoring function over experts (DeepSeek-V3 uses sigmoid)."""
    expert_bias: bool = False
    """Whether the router has a per-expert bias vector (DeepSeek-V3 e_score_correction_bias)."""
    expert_groups: int | None = Field(default=None, ge=1)
    """Expert groups for group-limited routing (DeepSeek ``n_group``); None = no grouping."""
    topk_groups: int | None = Field(default=None, ge=1)
    """Groups a token may route into (DeepSeek ``topk_group``); None = no grouping."""

    # --- attention -----------------------------------------------------------------------
    attention: Literal["mha", "gqa", "mla"]
    """Attention kind: multi-head, grouped-query, or DeepSeek multi-head latent attention."""
    heads: int = Field(ge=1)
    """Query heads per attention layer, count."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (GQA), count; None means ``heads``; ignored for MLA."""
    head_dim: int | None = Field(default=None, ge=1)
    """Per-head width for MHA/GQA, elements; None means ``d_model // heads``."""
    attention_bias: bool = False
    """Whether the q, k and v projections carry biases (Qwen1.5)."""
    qk_norm: bool = False
    """Whether q and k are RMS-normed over their full projected width (OLMoE)."""
    q_lora_rank: int | None = Field(default=None, ge=1)
    """MLA query compression rank, elements; None = full-rank query projection."""
    kv_lora_rank: int | None = Field(default=None, ge=1)
    """MLA key/value latent width (the cached latent), elements."""
    qk_nope_head_dim: int | None = Field(default=None, ge=1)
    """MLA per-head query/key width without rotary position, elements."""
    qk_rope_head_dim: int | None = Field(default=None, ge=1)
    """MLA per-head (shared-key) rotary width, elements."""
    v_head_dim: int | None = Field(default=None, ge=1)
    """MLA per-head value width, elements."""
    attention_dtype: Literal["bf16", "fp16", "fp32", "fp8"] | None = None
    """Precision of the attention core as served (the scores and the attention-weighted
    values); None: the model's ``dtype`` (DeepSeek's production: bf16 with fp8 weights)."""
    kv_cache_dtype: Literal["bf16", "fp16", "fp32", "fp8"] | None = None
    """Storage type of the KV cache (MLA: its latent and rotary key); None: the model's
    ``dtype``."""
    mla_absorbed_decode: bool = False
    """MLA only: decode steps attend in the latent space (the key up-projection folded into
    the query, the value's into the output: per head ``kv_lora_rank + qk_rope_head_dim``
    query/key and ``kv_lora_rank`` value widths over the cached latent), as DeepSeek's
    FlashMLA decode kernel does; a batch that computes logits at every token it computes
    (decodes, speculative verification) is priced so. False: every batch un-absorbed."""

    @field_validator("sources")
    @classmethod
    def _sources_name_fields(cls, sources: dict[str, str]) -> dict[str, str]:
        for key, value in sources.items():
            if key not in cls.model_fields:
                raise ValueError(
                    f"sources key {key!r} is not a field of ModelConfig "
                    f"(fields: {', '.join(sorted(cls.model_fields))})"
                )
            if not value.strip():
                raise ValueError(f"sources[{key!r}] is empty: give a citation")
        return sources

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        """Every internal inconsistency at once, one ``field: message`` line each."""
        problems = list(self._problems())
        if problems:
            raise ValueError("\n".join(f"{field}: {msg}" for field, msg in problems))
        return self

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.top_k > self.experts:
            yield "top_k", f"must be <= model.experts ({self.experts}), got {self.top_k}"
        if (self.expert_groups is None) != (self.topk_groups is None):
            yield "topk_groups", "expert_groups and topk_groups must be set together"
        if self.expert_groups is not None and self.topk_groups is not None:
            if self.experts % self.expert_groups:
                yield (
                    "expert_groups",
                    f"must divide model.experts ({self.experts}), got {self.expert_groups}",
                )
            if self.topk_groups > self.expert_groups:
                yield (
                    "topk_groups",
                    f"must be <= model.expert_groups ({self.expert_groups}), "
                    f"got {self.topk_groups}",
                )
            reachable = self.topk_groups * (self.experts // self.expert_groups)
            if self.top_k > reachable:
                yield (
                    "top_k",
                    f"must be <= the {reachable} experts of topk_groups={self.topk_groups} "
                    f"groups, got {self.top_k}",
                )
        if self.architecture == "decoder" and self.encoder_layers:
            yield "encoder_layers", f"must be 0 for a decoder-only model, got {self.encoder_layers}"
        if self.architecture == "encoder_decoder" and not 0 < self.encoder_layers < self.layers:
            yield (
                "encoder_layers",
                f"encoder_decoder needs 0 < encoder_layers < layers ({self.layers}), "
                f"got {self.encoder_layers}",
            )
        for size in self._stack_sizes():
            if self.first_dense_layers > size:
                yield (
                    "first_dense_layers",
                    f"must be <= the stack's {size} blocks, got {self.first_dense_layers}",
                )
                break
        mla_fields = (
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        if self.attention == "mla":
            for f in mla_fields[1:]:
                if getattr(self, f) is None:
                    yield f, "required when attention is 'mla'"
            if self.kv_heads not in (None, self.heads):
                yield "kv_heads", "MLA has no separate kv_heads (leave it unset)"
        else:
            for f in mla_fields:
                if getattr(self, f) is not None:
                    yield f, f"applies only to attention 'mla' (attention is {self.attention!r})"
            kv = self.kv_heads_resolved
            if self.heads % kv:
                yield "kv_heads", f"must divide model.heads ({self.heads}), got {kv}"
            elif self.attention == "mha" and kv != self.heads:
                yield (
                    "kv_heads",
                    f"attention 'mha' needs kv_heads == heads ({self.heads}), got {kv}",
                )
            if self.head_dim is None and self.d_model % self.heads:
                yield (
                    "head_dim",
                    f"required: d_model ({self.d_model}) is not a multiple of heads ({self.heads})",
                )
        if self.dense_layer_indices and self.dense_d_ff is None:
            yield (
                "dense_d_ff",
                f"required: blocks {list(self.dense_layer_indices)[:4]} are dense FFN blocks",
            )
        if self.shared_expert_gate and self.shared_experts == 0:
            yield "shared_expert_gate", "needs shared_experts >= 1"

    # --- convenience -----------------------------------------------------------------------
    def _stack_sizes(self) -> tuple[int, ...]:
        if self.architecture == "encoder_decoder":
            return (self.encoder_layers, self.layers - self.encoder_layers)
        return (self.layers,)

    def _is_moe_local(self, j: int) -> bool:
        start = self.first_dense_layers
        return j >= start and (j - start + 1) % self.moe_layer_frequency == 0

    @property
    def decoder_layers(self) -> int:
        """Decoder blocks, count (all blocks for a decoder-only model)."""
        return self.layers - self.encoder_layers

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Global indices of the MoE blocks (encoder blocks first for encoder-decoder)."""
        out: list[int] = []
        offset = 0
        for size in self._stack_sizes():
            out.extend(offset + j for j in range(size) if self._is_moe_local(j))
            offset += size
        return tuple(out)

    @property
    def dense_layer_indices(self) -> tuple[int, ...]:
        """Global indices of the blocks with a dense FFN."""
        moe = set(self.moe_layer_indices)
        return tuple(i for i in range(self.layers) if i not in moe)

    @property
    def is_gated(self) -> bool:
        """Whether a routed (and shared) expert has three matrices (gate, up, down)."""
        return self.activation in _GATED

    @property
    def dense_is_gated(self) -> bool:
        """Whether the dense FFNs have three matrices."""
        return (self.dense_activation or self.activation) in _GATED

    @property
    def bytes_per_param(self) -> int:
        """Bytes per stored weight for ``dtype`` (fp8 1, bf16/fp16 2, fp32 4)."""
        return BYTES_PER_ELEMENT[self.dtype]

    @property
    def shared_d_ff(self) -> int:
        """Hidden width of one shared expert, elements."""
        return self.shared_expert_d_ff if self.shared_expert_d_ff is not None else self.expert_d_ff

    @property
    def kv_heads_resolved(self) -> int:
        """Key/value heads, count (``heads`` when unset)."""
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def head_dim_resolved(self) -> int:
        """Per-head width for MHA/GQA, elements (``d_model // heads`` when unset)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.heads
