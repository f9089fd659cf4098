"""Parameter counts, per-token FLOPs and weight bytes derived from a ``ModelConfig``.

Pure functions, no I/O. Conventions (checked against publishers' totals in
``tests/test_model_figures.py``):

* **Total parameters** count every weight: input embedding, output head (once if tied),
  attention projections (and MLA's low-rank projections and latent norms, q/k norms, qkv
  biases), cross-attention in encoder-decoder decoders, dense FFNs, routed experts, shared
  experts and their gate, routers (``d_model x experts``, plus a per-expert bias when
  ``expert_bias``), and every norm (per-block norms and each stack's final norm). T5/GLaM
  relative position bias tables are not counted (under 0.01%).
* **Active parameters** (per token) are all of the above except routed experts, plus
  ``top_k`` routed experts in each MoE block. The input embedding and the output head are
  both included (tied: once). Mixtral, OLMoE, Qwen1.5-MoE, DBRX and GLaM publish active counts
  with this convention; DeepSeek's published active counts leave the input embedding out,
  which ``active_params - input_embedding_params`` reproduces.
* **FLOPs per token (forward)** = ``2 x active_matmul_params`` + attention-score FLOPs.
  ``active_matmul_params`` are the active weight-matrix entries outside the embedding and the
  output head (attention and cross-attention projections, dense FFNs, the active routed and
  shared experts, routers, the shared-expert gate); biases and norms do no matmul and are
  left out. The output head's ``2 x d_model x vocab`` per token is reported separately as
  ``head_flops_per_token`` and not included. Attention scores (QK^T and AV) add
  ``2 x heads x (qk_dim + v_dim) x seq_len`` per attention layer, where ``seq_len`` is the
  number of keys the token attends to (the context length; cross-attention uses the same
  ``seq_len`` for the encoder length). ``seq_len=0`` (the default) leaves them out. MLA is
  counted in its un-absorbed form (per-head qk width ``nope+rope``, v width ``v_head_dim``).
* **Bytes** are parameters times ``bytes_per_param`` of the model's ``dtype``; block-scale
  factors of fp8 checkpoints are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.model import ModelConfig


@dataclass(frozen=True)
class ModelFigures:
    """Counts derived from one model's shape; parameters in elements, FLOPs and bytes absolute."""

    total_params: int
    """Every weight of the model, count."""
    active_params: int
    """Weights used per token: all but routed experts, plus top_k routed experts per MoE block."""
    embedding_params: int
    """Input embedding plus output head (counted once when tied), count."""
    input_embedding_params: int
    """Input embedding table, count."""
    output_head_params: int
    """Untied output head, count (0 when tied)."""
    attention_params_per_layer: int
    """Self-attention weights of one block (projections, MLA latent norms, q/k norms, biases)."""
    cross_attention_params_per_layer: int
    """Cross-attention weights of one decoder block of an encoder-decoder model (0 otherwise)."""
    dense_ffn_params: int
    """Weights of one dense (non-MoE) FFN, count (0 if there is none)."""
    expert_params: int
    """Weights of one routed expert, count."""
    shared_expert_params: int
    """Weights of one shared expert, count."""
    router_params_per_layer: int
    """Router weights of one MoE block (plus expert bias and shared-expert gate), count."""
    routed_expert_params_total: int
    """All routed experts of all MoE blocks, count."""
    norm_params_total: int
    """All norm scales (and biases), count."""
    moe_layers: int
    """MoE blocks, count."""
    dense_layers: int
    """Dense-FFN blocks, count."""
    active_matmul_params: int
    """Active weight-matrix entries per token outside embedding and output head, count."""
    flops_per_token_forward: int
    """Forward FLOPs per token: 2 x active_matmul_params, plus attention scores if seq_len > 0."""
    head_flops_per_token: int
    """Forward FLOPs per token of the output head (2 x d_model x vocab), not in the figure above."""
    weight_bytes: int
    """Bytes of all weights at the model's dtype."""
    expert_bytes: int
    """Bytes of one routed expert at the model's dtype."""


def ffn_params(d_model: int, d_ff: int, gated: bool) -> int:
    """Weights of one FFN (no biases): 3 matrices when gated, else 2."""
    return (3 if gated else 2) * d_model * d_ff


def _attention_matmul(m: ModelConfig) -> int:
    """Weight-matrix entries of one self-attention (no biases, no norms)."""
    d = m.d_model
    if m.attention == "mla":
        assert m.kv_lora_rank is not None and m.qk_nope_head_dim is not None
        assert m.qk_rope_head_dim is not None and m.v_head_dim is not None
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q = d * m.heads * qk
        else:
            q = d * m.q_lora_rank + m.q_lora_rank * m.heads * qk
        kv_a = d * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv_b = m.kv_lora_rank * m.heads * (m.qk_nope_head_dim + m.v_head_dim)
        o = m.heads * m.v_head_dim * d
        return q + kv_a + kv_b + o
    hd = m.head_dim_resolved
    q_width = m.heads * hd
    kv_width = m.kv_heads_resolved * hd
    return d * q_width + 2 * d * kv_width + q_width * d


def _attention_extra(m: ModelConfig) -> int:
    """Non-matmul weights of one self-attention: MLA latent norms, q/k norms, qkv biases."""
    if m.attention == "mla":
        assert m.kv_lora_rank is not None
        norms = m.kv_lora_rank + (m.q_lora_rank or 0)
        return norms * (2 if m.norm_bias else 1)
    hd = m.head_dim_resolved
    q_width = m.heads * hd
    kv_width = m.kv_heads_resolved * hd
    extra = 0
    if m.attention_bias:
        extra += q_width + 2 * kv_width
    if m.qk_norm:
        extra += q_width + kv_width
    return extra


def _score_flops(m: ModelConfig, seq_len: int) -> int:
    """QK^T and AV FLOPs of one attention layer for one token attending ``seq_len`` keys."""
    if m.attention == "mla":
        assert m.qk_nope_head_dim is not None and m.qk_rope_head_dim is not None
        assert m.v_head_dim is not None
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk = v = m.head_dim_resolved
    return 2 * m.heads * (qk + v) * seq_len


def figures(model: ModelConfig, seq_len: int = 0) -> ModelFigures:
    """Parameter counts, forward FLOPs per token and weight bytes of ``model``.

    ``seq_len`` is the number of keys each token attends to, for the attention-score FLOPs;
    0 (the default) leaves those FLOPs out.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    m = model
    d = m.d_model
    norm_size = d * (2 if m.norm_bias else 1)

    n_moe = len(m.moe_layer_indices)
    n_dense = m.layers - n_moe
    n_cross = m.decoder_layers if m.architecture == "encoder_decoder" else 0
    n_stacks = 2 if m.architecture == "encoder_decoder" else 1

    attn_matmul = _attention_matmul(m)
    attn = attn_matmul + _attention_extra(m)
    cross = attn if n_cross else 0
    cross_matmul = attn_matmul if n_cross else 0

    dense_ffn = ffn_params(d, m.dense_d_ff, m.dense_is_gated) if m.dense_d_ff else 0
    expert = ffn_params(d, m.expert_d_ff, m.is_gated)
    shared = ffn_params(d, m.shared_d_ff, m.is_gated)
    router_matmul = d * m.experts + (d if m.shared_expert_gate else 0)
    router = router_matmul + (m.experts if m.expert_bias else 0)

    input_emb = m.vocab_size * d
    head = 0 if m.tied_embeddings else m.vocab_size * d
    # Two norms per block (pre-attention, pre-FFN), a third before cross-attention, and one
    # final norm per stack.
    norms = norm_size * (2 * m.layers + n_cross + n_stacks)

    routed_total = n_moe * m.experts * expert
    non_routed = (
        input_emb
        + head
        + m.layers * attn
        + n_cross * cross
        + n_dense * dense_ffn
        + n_moe * (m.shared_experts * shared + router)
        + norms
    )
    total = non_routed + routed_total
    active = non_routed + n_moe * m.top_k * expert

    active_matmul = (
        m.layers * attn_matmul
        + n_cross * cross_matmul
        + n_dense * dense_ffn
        + n_moe * ((m.top_k * expert) + m.shared_experts * shared + router_matmul)
    )
    score = (m.layers + n_cross) * _score_flops(m, seq_len)
    bpp = m.bytes_per_param
    return ModelFigures(
        total_params=total,
        active_params=active,
        embedding_params=input_emb + head,
        input_embedding_params=input_emb,
        output_head_params=head,
        attention_params_per_layer=attn,
        cross_attention_params_per_layer=cross,
        dense_ffn_params=dense_ffn,
        expert_params=expert,
        shared_expert_params=shared,
        router_params_per_layer=router,
        routed_expert_params_total=routed_total,
        norm_params_total=norms,
        moe_layers=n_moe,
        dense_layers=n_dense,
        active_matmul_params=active_matmul,
        flops_per_token_forward=2 * active_matmul + score,
        head_flops_per_token=2 * d * m.vocab_size,
        weight_bytes=total * bpp,
        expert_bytes=expert * bpp,
    )
