"""The attention core's precision and the KV cache's dtype as explicit model inputs
(``model.attention_dtype``, ``model.kv_cache_dtype``; issue 16): closed forms on
DeepSeek-V3 on an H800, defaults unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from moesim.cost.attention import AttentionCost
from moesim.cost.compute import Roofline
from moesim.derived.serving_memory import kv_bytes_per_token_per_layer
from moesim.loader import scenario_from_dict
from moesim.units import BYTES_PER_ELEMENT


def _scenario(**model: Any) -> Any:
    return scenario_from_dict(
        {
            "name": "mla",
            "cluster": {"preset": "h800-rail", "nodes": 1},
            "model": {"preset": "deepseek-v3", **model},
            "parallelism": {"dp": 8, "ep": 8},
            "workload": {"kind": "layer", "tokens": 1024},
        }
    )


def _cost(**model: Any) -> AttentionCost:
    s = _scenario(**model)
    m, acc = s.model, s.cluster.accelerator
    rf = Roofline.of(acc, m.dtype, m.bytes_per_param, s.cluster.profile, "graph")
    return AttentionCost(rf, m, 1, "fused", None, acc)


def test_kv_cache_bytes_follow_the_kv_dtype() -> None:
    """MLA caches kv_lora_rank + qk_rope_head_dim = 576 values per token and layer: 576
    bytes in the fp8 model's own dtype, 1,152 with a bf16 cache."""
    assert kv_bytes_per_token_per_layer(_scenario().model, 1) == 576
    assert kv_bytes_per_token_per_layer(_scenario(kv_cache_dtype="bf16").model, 1) == 1152
    assert _cost(kv_cache_dtype="bf16").kv_bytes == 1152


def test_a_bf16_core_of_an_fp8_model_runs_at_the_bf16_rate() -> None:
    """A long prefill chunk is compute-bound: its scores take the H800's fp8 / bf16 peak
    ratio (1978.9 / 989.4) longer in bf16; a decode is memory-bound: its time grows by the
    bf16 query/output bytes and (with a bf16 cache) the doubled KV reads."""
    fp8, bf16 = _cost(), _cost(attention_dtype="bf16")
    acc = _scenario().cluster.accelerator
    ratio = acc.peak_tflops.for_dtype("fp8") / acc.peak_tflops.for_dtype("bf16")
    assert bf16.core_scale == pytest.approx(ratio, rel=1e-12)
    assert bf16.core_flops_per_s == pytest.approx(fp8.rf.flops_per_s / ratio, rel=1e-12)
    n, c = 16384, 0
    keys = n * c + n * (n + 1) // 2
    t8, t16 = fp8.score_s(n, keys, n), bf16.score_s(n, keys, n)
    over = fp8.rf.overhead_s
    assert (t16 - over) == pytest.approx(ratio * (t8 - over), rel=1e-9)
    # decode: 128 sequences of 5,000 cached tokens, memory-bound
    seqs, kv = 128, 5000
    both = _cost(attention_dtype="bf16", kv_cache_dtype="bf16")
    reads8 = seqs * (kv + 1) * 576 + seqs * fp8.width * 1
    reads16 = seqs * (kv + 1) * 1152 + seqs * fp8.width * BYTES_PER_ELEMENT["bf16"]
    d8 = fp8.score_s(seqs, seqs * (kv + 1), seqs * (kv + 1)) - over
    d16 = both.score_s(seqs, seqs * (kv + 1), seqs * (kv + 1)) - over
    assert d8 == pytest.approx(reads8 / fp8.rf.bytes_per_s, rel=1e-9)
    assert d16 == pytest.approx(reads16 / fp8.rf.bytes_per_s, rel=1e-9)


def test_defaults_are_the_model_dtype() -> None:
    """Without the fields the core runs in the model's dtype (scale 1, its element width),
    and the vectorized and scalar forms agree."""
    a = _cost()
    assert a.core_scale == 1.0 and a.core_bytes_per_element == a.rf.bytes_per_element
    b = _cost(attention_dtype="fp8", kv_cache_dtype="fp8")
    for n, k, kv in ((1, 4000, 4000), (4096, 4096 * 2048, 4096)):
        assert b.score_s(n, k, kv) == a.score_s(n, k, kv)
        assert float(a.scores_s([n], [k], [kv])[0]) == a.score_s(n, k, kv)
    training = AttentionCost(a.rf, _scenario(attention_dtype="bf16").model, 1)
    assert training.core_scale == 1.0  # training keeps its own precision convention


def test_absorbed_decode_attends_in_the_latent_space() -> None:
    """With ``mla_absorbed_decode`` a batch whose every computed token gets logits (decodes,
    verified drafts) attends over the 576-wide latent keys and 512-wide latent values of
    each of the 128 heads: 2 x 128 x 1,088 FLOPs per (query, key) instead of the
    un-absorbed 2 x 128 x 320; a prefill chunk (fewer logits than tokens) stays
    un-absorbed; the scalar and vectorized forms agree; off by default."""
    a = _cost(attention_dtype="bf16", kv_cache_dtype="bf16", mla_absorbed_decode=True)
    plain = _cost(attention_dtype="bf16", kv_cache_dtype="bf16")
    assert a.absorbed_width == 128 * (2 * 512 + 64) and plain.absorbed_width == 0
    assert a.width == plain.width == 128 * (192 + 128)
    seqs, c, q = 128, 5000, 2  # two tokens per sequence: one draft verified
    keys = seqs * (q * c + q * (q + 1) // 2)
    kv = seqs * (c + q)
    over = a.rf.overhead_s
    dec = a.score_s(seqs * q, keys, kv, seqs * q) - over
    flops = 2.0 * a.absorbed_width * keys * a.core_scale
    reads = kv * 1152 + seqs * q * a.absorbed_width * 2
    assert dec == pytest.approx(max(flops / a.rf.flops_per_s, reads / a.rf.bytes_per_s), rel=1e-9)
    assert dec > plain.score_s(seqs * q, keys, kv, seqs * q) - over
    pre = (4096, 4096 * 4097 // 2, 4096, 1)
    assert a.score_s(*pre) == plain.score_s(*pre)
    vec = a.scores_s([seqs * q, 4096], [keys, pre[1]], [kv, 4096], [seqs * q, 1])
    assert float(vec[0]) == a.score_s(seqs * q, keys, kv, seqs * q)
    assert float(vec[1]) == a.score_s(*pre)
