"""Derived parameter counts of the model presets against the publishers' own totals.

Published figures (the expected values below are data; the derived ones come from the code):

| preset | total | active | citation |
|---|---|---|---|
| switch-base-128 | 7.4B | - | Fedus et al. 2021 (arXiv:2101.03961) Table 9 / HF model card |
| switch-c-2048 | 1571B | - | Fedus et al. 2021 (arXiv:2101.03961) Table 9, Switch-C |
| gshard-600b | 600B | - | Lepikhin et al. 2020 (arXiv:2006.16668), MoE(2048E, 36L) |
| glam-1.2t | 1162B | 96.6B | Du et al. 2021 (arXiv:2112.06905) Table 4, GLaM (64B/64E) |
| mixtral-8x7b | 46.7B | 12.9B | mistral.ai/news/mixtral-of-experts (Dec 2023) |
| mixtral-8x22b | 141B | 39B | mistral.ai/news/mixtral-8x22b (Apr 2024) |
| olmoe-1b-7b | 6.9B | 1.3B | Muennighoff et al. 2024, OLMoE (arXiv:2409.02060) Table 1 |
| qwen1.5-moe-a2.7b | 14.3B | 2.7B | qwenlm.github.io/blog/qwen-moe (Mar 2024) |
| deepseek-v2-lite | 15.7B | 2.4B | DeepSeek-V2 report (arXiv:2405.04434) Sec. 1 / App. B |
| deepseek-v3 | 671B | 37B | DeepSeek-V3 report (arXiv:2412.19437) abstract (excl. MTP) |
| dbrx | 132B | 36B | databricks.com/blog/introducing-dbrx (Mar 2024) |

Active-count conventions: the derived ``active_params`` include the input embedding and the
output head. DeepSeek's published active counts leave the input embedding out (V2-Lite's 2.4B
is reproduced only that way: 2.45B without it, 2.66B with it), so for DeepSeek presets the
comparison uses ``active_params - input_embedding_params``.

Tolerance is 3% everywhere except gshard-600b's total (4%): the paper's "600B" is a rounded
figure that an honest count cannot reach; 18 MoE blocks x 2048 ReLU experts of 2 x 1024 x 8192
alone are 618.5B (+3.1%), and the paper's sibling rows sit 3-6% under the same formula.
"""

from __future__ import annotations

import pytest

from moesim.catalog import names, raw_preset
from moesim.config.model import ModelConfig
from moesim.derived.model_figures import figures

B = 1e9
TOLERANCE = 0.03

# preset -> (published total, published active or None, active convention)
PUBLISHED: dict[str, tuple[float, float | None, str]] = {
    "switch-base-128": (7.4 * B, None, "all"),
    "switch-c-2048": (1571 * B, None, "all"),
    "gshard-600b": (600 * B, None, "all"),
    "glam-1.2t": (1162 * B, 96.6 * B, "all"),
    "mixtral-8x7b": (46.7 * B, 12.9 * B, "all"),
    "mixtral-8x22b": (141 * B, 39 * B, "all"),
    "olmoe-1b-7b": (6.9 * B, 1.3 * B, "all"),
    "qwen1.5-moe-a2.7b": (14.3 * B, 2.7 * B, "all"),
    "deepseek-v2-lite": (15.7 * B, 2.4 * B, "no_input_embedding"),
    "deepseek-v3": (671 * B, 37 * B, "no_input_embedding"),
    "dbrx": (132 * B, 36 * B, "all"),
}

# Wider tolerances, only where the published figure cannot be reached honestly (see above).
TOTAL_TOLERANCE: dict[str, float] = {
    # Paper rounds to "600B"; the experts alone are 618.5B (+3.1%).
    "gshard-600b": 0.04,
}


def _model(name: str, **update: object) -> ModelConfig:
    return ModelConfig(**{**raw_preset("models", name), **update})


def test_catalog_holds_exactly_the_published_presets() -> None:
    """The model catalog has exactly the presets whose totals are checked here."""
    assert sorted(names("models")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", names("models"))
def test_every_preset_validates(name: str) -> None:
    """Each preset loads into a ModelConfig with its catalog key as name."""
    model = _model(name)
    assert model.name == name
    assert model.moe_layer_indices


@pytest.mark.parametrize("name", names("models"))
def test_every_preset_has_a_source(name: str) -> None:
    """Each preset cites a non-empty source."""
    assert _model(name).source.strip()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_params_match_published(name: str) -> None:
    """Derived total parameters are within tolerance of the published total."""
    published, _, _ = PUBLISHED[name]
    derived = figures(_model(name)).total_params
    tol = TOTAL_TOLERANCE.get(name, TOLERANCE)
    assert derived == pytest.approx(published, rel=tol), f"{name}: {derived / B:.2f}B"


@pytest.mark.parametrize("name", sorted(n for n, v in PUBLISHED.items() if v[1] is not None))
def test_active_params_match_published(name: str) -> None:
    """Derived active parameters, in the publisher's convention, are within 3% of published."""
    _, published, convention = PUBLISHED[name]
    fig = figures(_model(name))
    derived = fig.active_params
    if convention == "no_input_embedding":
        derived -= fig.input_embedding_params
    assert derived == pytest.approx(published, rel=TOLERANCE), f"{name}: {derived / B:.3f}B"


def test_top_k_above_experts_raises() -> None:
    """A config routing each token to more experts than exist is rejected."""
    with pytest.raises(ValueError, match=r"top_k: must be <= model.experts \(8\), got 9"):
        _model("mixtral-8x7b", top_k=9)


def test_inconsistent_groups_and_heads_raise() -> None:
    """Group counts must divide experts and cover top_k; kv_heads must divide heads."""
    with pytest.raises(
        ValueError, match=r"expert_groups: must divide model.experts \(256\), got 7"
    ):
        _model("deepseek-v3", expert_groups=7, topk_groups=4)
    with pytest.raises(
        ValueError, match=r"topk_groups: must be <= model.expert_groups \(8\), got 9"
    ):
        _model("deepseek-v3", topk_groups=9)
    with pytest.raises(ValueError, match=r"kv_heads: must divide model.heads \(32\), got 5"):
        _model("mixtral-8x7b", kv_heads=5)
    with pytest.raises(ValueError, match="not a field"):
        _model("mixtral-8x7b", sources={"no_such_field": "x"})


def test_gated_and_plain_experts_differ_by_one_matrix() -> None:
    """A gated expert has exactly one more d_model x expert_d_ff matrix than a plain one."""
    gated = _model("mixtral-8x7b")
    plain = _model("mixtral-8x7b", activation="gelu")
    assert gated.is_gated and not plain.is_gated
    diff = figures(gated).expert_params - figures(plain).expert_params
    assert diff == gated.d_model * gated.expert_d_ff


@pytest.mark.parametrize("name", names("models"))
def test_flops_are_twice_active_matmul_params_without_scores(name: str) -> None:
    """With seq_len=0 forward FLOPs per token are exactly 2 x active matmul params."""
    fig = figures(_model(name))
    assert fig.flops_per_token_forward == 2 * fig.active_matmul_params


def test_active_matmul_params_are_active_minus_embeddings_and_norms() -> None:
    """For a bias-free model, active matmul params = active - embeddings - norms."""
    fig = figures(_model("mixtral-8x7b"))
    expected = fig.active_params - fig.embedding_params - fig.norm_params_total
    assert fig.active_matmul_params == expected


def test_attention_score_flops_scale_with_seq_len() -> None:
    """seq_len adds 2 x heads x (qk + v width) x seq_len FLOPs per attention layer."""
    model = _model("mixtral-8x7b")
    base, long = figures(model), figures(model, seq_len=4096)
    per_layer = 2 * model.heads * (2 * model.head_dim_resolved) * 4096
    assert long.flops_per_token_forward - base.flops_per_token_forward == 32 * per_layer


def test_layer_placement_follows_the_published_configs() -> None:
    """DeepSeek-V3 keeps 3 dense leading layers; Switch makes odd blocks of each stack MoE."""
    v3 = _model("deepseek-v3")
    assert v3.moe_layer_indices == tuple(range(3, 61))
    switch = _model("switch-base-128")
    assert switch.moe_layer_indices == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23)
    assert len(_model("glam-1.2t").moe_layer_indices) == 32


def test_bytes_follow_dtype() -> None:
    """Weight and expert bytes are parameter counts times bytes per parameter."""
    for name, bpp in (("deepseek-v3", 1), ("mixtral-8x7b", 2)):
        model = _model(name)
        fig = figures(model)
        assert model.bytes_per_param == bpp
        assert fig.weight_bytes == fig.total_params * bpp
        assert fig.expert_bytes == fig.expert_params * bpp
    assert _model("mixtral-8x7b", dtype="fp32").bytes_per_param == 4


def test_mla_attention_counts_low_rank_projections() -> None:
    """DeepSeek-V3 MLA per-layer weights match the hand count from its config."""
    d, h = 7168, 128
    expected = (
        d * 1536
        + 1536 * h * 192  # q_a, q_b
        + d * (512 + 64)
        + 512 * h * 256  # kv_a (latent + shared rope key), kv_b
        + h * 128 * d  # o
        + 1536
        + 512  # q_a and kv_a norms
    )
    assert figures(_model("deepseek-v3")).attention_params_per_layer == expected
