"""The one attention cost (moesim.cost.attention): decodes memory-bound and linear in the
cache, prefills paying the causal pairs, tensor parallelism splitting heads, and training
pricing its blocks' attention with the same function serving uses."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from moesim.catalog import raw_preset
from moesim.config.model import ModelConfig
from moesim.config.training import TrainingWorkload
from moesim.cost.attention import (
    AttentionCost,
    KernelRate,
    attention_forward_s,
    causal_keys,
    measured_rate,
)
from moesim.cost.compute import Roofline
from moesim.cost.layer_cost import MoELayerCost
from moesim.cost.training import _expert_products_s, _glue_s, block_costs, step_kernels
from moesim.loader import scenario_from_dict
from moesim.system import build_system

#: an H100-like hard-max roofline with a fixed launch cost
RF = Roofline(
    flops_per_s=800e12,
    bytes_per_s=3e12,
    overhead_s=5e-6,
    bytes_per_element=2,
    memory_bytes_per_s=3e12,
)
OH = 5e-6


def _model(name: str) -> ModelConfig:
    return ModelConfig(**raw_preset("models", name))


MIXTRAL = _model("mixtral-8x7b")


def test_decode_is_memory_bound_and_linear_in_cached_tokens() -> None:
    """A one-token decode reads every cached token's KV once: memory-bound, and its kernel
    time grows by exactly the KV bytes of a token per cached token."""
    a = AttentionCost(RF, MIXTRAL, tp=1)
    caches = [1024, 2048, 4096, 8192]
    t = [a.forward([(1, c)]).scores_s for c in caches]
    for c, tc in zip(caches, t):
        flops = 2 * a.width * causal_keys(1, c)
        nbytes = (c + 1) * a.kv_bytes + a.width * RF.bytes_per_element
        assert flops / RF.flops_per_s < nbytes / RF.bytes_per_s  # memory-bound
        assert tc == pytest.approx(OH + nbytes / RF.bytes_per_s, rel=1e-12)
    slope = a.kv_bytes / RF.bytes_per_s
    for (c0, t0), (c1, t1) in zip(zip(caches, t), zip(caches[1:], t[1:])):
        assert (t1 - t0) / (c1 - c0) == pytest.approx(slope, rel=1e-9)


def test_prefill_pays_the_causal_pairs() -> None:
    """A prefill of n tokens after c cached ones costs the FLOPs of n c + n (n + 1) / 2
    (query, key) pairs, so doubling a long prompt roughly quadruples its score FLOPs."""
    a = AttentionCost(RF, MIXTRAL, tp=1)
    assert causal_keys(4, 0) == 10 and causal_keys(3, 5) == 3 * 5 + 6

    def flops_s(n: int, c: int = 0) -> float:
        return a.forward([(n, c)]).scores_s - OH

    for n in (4096, 8192):
        assert flops_s(n) == pytest.approx(
            2 * a.width * n * (n + 1) / 2 / RF.flops_per_s, rel=1e-12
        )
    assert flops_s(16384) / flops_s(8192) == pytest.approx(4.0, rel=1e-3)
    # a chunk after a cache pays the rectangle plus the triangle; two sequences add
    assert flops_s(2048, 6144) == pytest.approx(
        2 * a.width * (2048 * 6144 + 2048 * 2049 / 2) / RF.flops_per_s, rel=1e-12
    )
    both = a.forward([(4096, 0), (4096, 0)]).scores_s - OH
    assert both == pytest.approx(2 * flops_s(4096), rel=1e-12)


def test_tp_splits_heads() -> None:
    """With tp devices each holds heads / tp query heads (and KV heads for GQA, while MLA's
    latent is replicated): a compute-bound prefill's scores and projections halve at tp=2."""
    rf = Roofline(
        flops_per_s=800e12,
        bytes_per_s=3e12,
        overhead_s=0.0,
        bytes_per_element=2,
        memory_bytes_per_s=3e12,
    )
    one, two = AttentionCost(rf, MIXTRAL, 1), AttentionCost(rf, MIXTRAL, 2)
    assert two.heads == MIXTRAL.heads // 2 and two.width * 2 == one.width
    assert two.kv_bytes * 2 == one.kv_bytes
    big = [(8192, 0)]
    assert two.forward(big).scores_s == pytest.approx(one.forward(big).scores_s / 2, rel=1e-12)
    assert two.forward(big).projections_s == pytest.approx(
        one.forward(big).projections_s / 2, rel=1e-12
    )
    v3 = _model("deepseek-v3")
    mla1, mla8 = AttentionCost(rf, v3, 1), AttentionCost(rf, v3, 8)
    assert mla8.heads * 8 == v3.heads and mla8.kv_bytes == mla1.kv_bytes


class _FixedMoE:
    """A stand-in MoE layer cost: every sample takes 1 ms of which 0.25 ms all-to-all."""

    class _Sample:
        time_s, comm_s, dropped_fraction = 1e-3, 0.25e-3, 0.0

    def sample(self, tokens: int) -> _FixedMoE._Sample:
        return self._Sample()


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_training_blocks_price_attention_with_the_shared_function(recompute: str) -> None:
    """A training block's attention: the shared attention cost over the micro-batch
    (sequences of seq_len new tokens, none cached; the fused kernel at the profile's
    measured rate, as serving prices it), the step kernels' attention backward over the
    same FLOPs (``2 x width x causal keys``), and the block's glue (norms, RoPE, residual adds);
    backward = 2x projections + the attention backward (+ the forward scores again under
    selective recompute)."""
    system = build_system(
        scenario_from_dict(
            {
                "name": "attn",
                "cluster": "h200x2",
                "model": "mixtral-8x7b",
                "parallelism": {"dp": 2, "ep": 2},
                "workload": {"kind": "layer", "tokens": 1},
            }
        )
    )
    m = system.scenario.model
    rf = system.layer_costs.roofline
    w = TrainingWorkload(
        kind="training",
        seq_len=1536,
        micro_batch_sequences=3,
        microbatches=2,
        recompute=recompute,
    )
    blocks = block_costs(system, w, cast(MoELayerCost, _FixedMoE()))
    profile = system.scenario.cluster.accelerator.profile
    rate = measured_rate(profile)
    assert rate is not None  # the H200 profile measured the kernel
    attn = AttentionCost(rf, m, 1, rate=rate).forward([(1536, 0)] * 3)
    k = step_kernels(system)
    flops = 2.0 * AttentionCost(rf, m, 1).width * causal_keys(1536, 0) * 3
    scores_f, scores_b = attn.scores_s, k.attention_bwd_s(flops, 1536)
    # at the measured rate the kernel is slower than at the GEMM rate
    assert scores_f > attention_forward_s(rf, m, 1, [(1536, 0)] * 3).scores_s
    g_attn_f, g_attn_b, g_ffn_f, g_ffn_b = _glue_s(k, system, w, 3 * 1536)
    fwd = attn.projections_s + scores_f + g_attn_f
    bwd = 2 * attn.projections_s + scores_b + g_attn_b
    if recompute == "selective":
        bwd += scores_f
    # the MoE block without overlap: + the layer's sample (fwd) and its glue; backward:
    # the sample once more plus its expert products (at most its compute, 0.75 ms)
    products = min(0.75e-3, _expert_products_s(system, 3 * 1536 * 2))
    assert blocks["moe"].fwd_s - 1e-3 - g_ffn_f == pytest.approx(fwd, rel=1e-12)
    assert blocks["moe"].bwd_s - (1e-3 + products + g_ffn_b) == pytest.approx(bwd, rel=1e-12)
    ffn = rf.dense_ffn_s(3 * 1536, m.d_model, m.dense_d_ff or m.expert_d_ff, m.activation)
    assert blocks["dense"].fwd_s - ffn - g_ffn_f == pytest.approx(fwd, rel=1e-12)
    assert blocks["dense"].bwd_s - 2 * ffn - g_ffn_b == pytest.approx(bwd, rel=1e-12)
    # the attention kernel is the measured one (the H200 profile's training section)
    assert k.source.startswith("measured")


def test_measured_kernel_rate_slows_prefill_not_decode() -> None:
    """With a measured rate (profile ``training:``), a long prefill chunk runs at the
    kernel's rate (slower than the GEMM rate), a decode stays memory-bound; the scalar and
    vectorized paths agree."""
    rf, m = RF, MIXTRAL
    slow = KernelRate(flops_per_s=rf.flops_per_s / 2, keys_knee=400.0)
    plain, rated = AttentionCost(rf, m, 1), AttentionCost(rf, m, 1, rate=slow)
    prefill = (4096, causal_keys(4096, 0), 4096)
    decode = (64, 64 * 4096, 64 * 4096)
    assert rated.score_s(*prefill) > 1.8 * plain.score_s(*prefill)
    assert rated.score_s(*decode) == pytest.approx(plain.score_s(*decode), rel=0.05)
    for t, k, kv in (prefill, decode, (1, 1, 1), (0, 0, 0)):
        vec = float(rated.scores_s(np.array([t]), np.array([k]), np.array([kv]))[0])
        assert rated.score_s(t, k, kv) == pytest.approx(vec, rel=1e-12)
