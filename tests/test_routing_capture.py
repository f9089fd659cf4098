"""The routing capture harness (moesim.calibrate.torch_routing): its shapes are the
catalog's, the numpy-reference source writes traces moesim reads, the router bias skews
them, and (where torch and transformers are installed) the HF path on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.calibrate.torch_routing import SHAPES, moe_layers, record_reference, save
from moesim.loader import scenario_from_dict
from moesim.routing.trace import model_problems, trace_info


def _model(name: str):  # type: ignore[no-untyped-def]
    return scenario_from_dict(
        {
            "name": "t",
            "cluster": "single-h200",
            "model": name,
            "workload": {"kind": "layer", "tokens": 1},
        }
    ).model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shapes_are_the_catalog_models(shape: str) -> None:
    m = _model(shape)
    k = SHAPES[shape]
    experts = k.get("num_local_experts") or k.get("num_experts") or k.get("n_routed_experts")
    d_ff = k.get("moe_intermediate_size") or k["intermediate_size"]
    assert (k["hidden_size"], experts, k["num_experts_per_tok"], d_ff, k["vocab_size"]) == (
        m.d_model,
        m.experts,
        m.top_k,
        m.expert_d_ff,
        m.vocab_size,
    )
    assert k["num_attention_heads"] == m.heads
    assert moe_layers(shape, m.layers) == len(m.moe_layer_indices)


def open_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return fh.read().splitlines()


def _hottest_share(path: str, experts: int) -> float:
    return float(trace_info(path, experts).popularity().max(axis=1).mean())


def test_reference_trace_is_read_back_and_bias_skews_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shares = []
    for std in (0.0, 2.0):
        trace, info = record_reference(
            "olmoe-1b-7b",
            3,
            prompts=2,
            prompt_tokens=16,
            decode_tokens=8,
            bias_std=std,
            seed=3,
            d_model=32,
            d_ff=16,
        )
        out = str(tmp_path / f"ref{std}")
        files = save(trace, info, out, ["test"], decode_only=True)
        m = _model("olmoe-1b-7b")
        for f in files[:2]:
            ti = trace_info(f, m.experts)
            assert ti.tokens == 2 * (16 + 8)
            assert model_problems(ti, m.experts, m.top_k, 3) == []
        env = json.loads((tmp_path / f"ref{std}.env.json").read_text())
        assert env["router_bias_std"] == std and env["source"] == "reference"
        assert len(open_lines(out + ".decode.jsonl")) == 2 * 8
        shares.append(_hottest_share(out + ".npz", m.experts))
    assert shares[1] > 1.5 * shares[0]


@pytest.mark.slow
def test_hf_capture_tiny_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moesim.calibrate.torch_routing import record_hf

    for shape in sorted(SHAPES):
        trace, info = record_hf(
            shape,
            2,
            prompts=1,
            prompt_tokens=4,
            decode_tokens=3,
            bias_std=1.0,
            seed=0,
            device="cpu",
            tiny=True,
        )
        e = np.asarray(trace.experts)
        assert e.shape == (4 + 3, moe_layers(shape, 2), info["top_k"])
        assert sorted(set(trace.step)) == list(range(4))
        assert (np.sort(e, axis=2)[..., 1:] != np.sort(e, axis=2)[..., :-1]).all()
