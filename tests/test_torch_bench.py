"""The PyTorch measurement harness (moesim.calibrate.torch_bench), run on the CPU at toy size.

Skipped where torch is not installed (the simulator itself never needs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesim.calibrate import torch_bench as tb  # noqa: E402

CPU = torch.device("cpu")


def _spec(activation: str = "swiglu", shared: int = 0, experts: int = 8, top_k: int = 2):
    return tb.LayerSpec(
        name=f"toy-{activation}",
        d_model=64,
        d_ff=32,
        experts=experts,
        top_k=top_k,
        activation=activation,
        shared_experts=shared,
        shared_d_ff=48 if shared else 0,
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_tiny_cpu_writes_parseable_records(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    models = "mixtral-8x7b,switch-base-128,qwen1.5-moe-a2.7b"
    rc = tb.main(["--out", str(out), "--device", "cpu", "--tiny", "--models", models])
    assert rc == 0
    recs = _read(out)
    kinds = {r["kind"] for r in recs}
    assert {"env", "launch", "d2d", "gemm", "grouped_gemm", "check", "moe_layer"} <= kinds
    assert "error" not in kinds and "stopped" not in kinds
    env = recs[0]
    assert env["kind"] == "env" and env["device"] == "cpu"
    assert isinstance(env["grouped_mm"], bool)
    for r in recs:
        if r["kind"] == "gemm":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["dtype"] == "fp32"
        if r["kind"] == "grouped_gemm":
            assert sum(r["counts"]) == r["tokens"] and len(r["counts"]) == r["groups"]
            assert r["impl"] in ("grouped_mm", "loop")
        if r["kind"] == "moe_layer":
            assert sum(r["counts"]) == r["tokens"] * r["top_k"]
            assert len(r["counts"]) == r["experts"]
            assert r["ms"] > 0
            parts = r["ms_parts"]
            assert set(parts) == {"router", "permute", "experts", "combine", "shared"}
            assert (parts["shared"] is None) == (r["shared_experts"] == 0)
            assert r["ms_graph"] is None  # no CUDA graphs on the CPU
        if r["kind"] == "check":
            assert r["ok"], r
    layers = [r for r in recs if r["kind"] == "moe_layer"]
    assert {r["model"] for r in layers} == set(models.split(","))
    assert {r["routing"] for r in layers} == {"uniform", "zipf1"}
    # every line is plain JSON (no NaN / Infinity literals)
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()


def test_only_sections_and_append(tmp_path: Path) -> None:
    out = tmp_path / "b.jsonl"
    tb.main(["--out", str(out), "--device", "cpu", "--tiny", "--only", "launch"])
    tb.main(["--out", str(out), "--device", "cpu", "--tiny", "--only", "memory"])
    kinds = [r["kind"] for r in _read(out)]
    assert kinds == ["env", "launch", "env", "d2d", "d2d"]
    with pytest.raises(SystemExit):
        tb.main(["--out", str(out), "--device", "cpu", "--only", "bogus"])


def test_budget_stops_gracefully(tmp_path: Path) -> None:
    out = tmp_path / "b.jsonl"
    args = ["--out", str(out), "--device", "cpu", "--tiny", "--only", "layers"]
    tb.main([*args, "--budget-s", "1e-9", "--models", "mixtral-8x7b"])
    recs = _read(out)
    assert recs[-1]["kind"] == "stopped" and recs[-1]["section"] == "layers"
    assert not any(r["kind"] == "moe_layer" for r in recs)


@pytest.mark.parametrize(
    ("activation", "shared"), [("swiglu", 0), ("geglu", 1), ("gelu", 0), ("relu", 2)]
)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layer_matches_dense_reference(activation: str, shared: int, dtype: str) -> None:
    dt = tb.DTYPES[dtype]
    layer = tb.MoELayer(_spec(activation, shared), CPU, dt, seed=3)
    chk = tb.check_layer(layer, ["grouped_mm", "loop"], tokens=24, seed=5)
    tol = 1e-5 if dtype == "fp32" else 1e-2
    assert chk["rel_err_grouped_mm"] < tol
    assert chk["rel_err_loop"] < tol
    assert chk["rel_err_grouped_vs_loop"] < tol
    assert chk["ok"]


def test_check_catches_a_wrong_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tb.MoELayer(_spec(), CPU, torch.float32, seed=3)
    real = layer.experts_loop
    monkeypatch.setattr(layer, "experts_loop", lambda perm: real(perm) * 1.1)
    chk = tb.check_layer(layer, ["grouped_mm", "loop"], tokens=16)
    assert not chk["ok"] and chk["rel_err_loop"] > 0.05 and chk["rel_err_grouped_mm"] < 1e-5


def test_padded_grouped_path_matches_unpadded() -> None:
    """The 16-row-aligned layout (used if a device rejects unaligned offsets) is exact."""
    spec = _spec(experts=16, top_k=4)
    plain = tb.MoELayer(spec, CPU, torch.float32, seed=1, align=1)
    padded = tb.MoELayer(spec, CPU, torch.float32, seed=1, align=16)
    x = plain.inputs(37, seed=2)
    bias = plain.routing_bias(37, "zipf1", seed=2)
    perm = padded.permute(x, padded.router(x, bias)[1], pad=True)
    assert perm.dest is not None
    offs = perm.offs.tolist()
    assert all(o % 16 == 0 for o in offs) and perm.xs.shape[0] >= offs[-1]
    y1 = plain.forward(x, bias, "grouped_mm")
    y2 = padded.forward(x, bias, "grouped_mm")
    y3 = padded.forward(x, bias, "loop")
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y3, y1, rtol=1e-5, atol=1e-6)


def _counts(layer: tb.MoELayer, tokens: int, routing: str, seed: int = 0) -> np.ndarray:
    x = layer.inputs(tokens, seed)
    _, ids = layer.router(x, layer.routing_bias(tokens, routing, seed))
    assert ids.shape == (tokens, layer.spec.top_k)
    # top-k picks distinct experts per token
    assert all(len(set(row)) == layer.spec.top_k for row in ids.tolist())
    return np.bincount(ids.reshape(-1).numpy(), minlength=layer.spec.experts)


def test_routing_counts_and_skew() -> None:
    layer = tb.MoELayer(_spec(experts=16, top_k=2), CPU, torch.float32)
    uni = _counts(layer, 2048, "uniform")
    zipf = _counts(layer, 2048, "zipf1")
    assert uni.sum() == zipf.sum() == 2048 * 2
    assert zipf.max() / zipf.mean() > 2.0 * (uni.max() / uni.mean())
    assert uni.max() / uni.mean() < 1.3
    # zipf popularity follows the expert index: expert 0 is the busiest
    assert zipf.argmax() == 0 and zipf[0] > zipf[8]
    # the same seed gives the same routing; another seed another one
    assert (_counts(layer, 256, "zipf1", 4) == _counts(layer, 256, "zipf1", 4)).all()
    assert (_counts(layer, 256, "zipf1", 4) != _counts(layer, 256, "zipf1", 5)).any()


def test_group_counts() -> None:
    for dist in ("uniform", "zipf1", "single"):
        c = tb.group_counts(8, 100, dist, seed=1)
        assert len(c) == 8 and sum(c) == 100
    assert tb.group_counts(8, 100, "single", seed=1)[0] == 100
    assert tb.group_counts(64, 1000, "zipf1", 0) == tb.group_counts(64, 1000, "zipf1", 0)
    p = tb.popularity(10, "zipf1")
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(10 * p[9])


def test_grouped_mm_and_loop_agree_on_cpu() -> None:
    g = tb._gen(CPU, 0)
    counts = [5, 0, 11, 1]
    x = tb._randn((sum(counts), 24), CPU, torch.float32, g)
    w = tb._randn((4, 16, 24), CPU, torch.float32, g)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    torch.testing.assert_close(
        tb.grouped_mm(x, w.transpose(-2, -1), offs), tb._loop_mm(x, w, counts)
    )
    padded, pc = tb._pad_rows(x, counts, 16)
    assert pc == [16, 0, 16, 16] and padded.shape[0] == 48


def test_catalog_specs_and_memory_rule() -> None:
    specs = tb.load_models()
    assert "mixtral-8x7b" in specs and "deepseek-v3" in specs
    mix = specs["mixtral-8x7b"]
    assert mix.gated and mix.n_mats == 3
    assert mix.expert_weight_bytes() == 8 * 3 * 4096 * 14336 * 2
    v3 = specs["deepseek-v3"]
    assert v3.shared_experts == 1 and v3.shared_d_ff == v3.d_ff == 2048
    qwen = specs["qwen1.5-moe-a2.7b"]
    assert qwen.shared_d_ff == 5632 and qwen.tiny().shared_d_ff == 32 * 4
    assert not specs["switch-base-128"].gated
    pairs = tb.gemm_shapes([mix])
    assert pairs == [(4096, 14336), (14336, 4096), (4096, 28672), (4096, 8)]
    assert len(tb.gemm_shapes(list(specs.values()))) == len(
        set(tb.gemm_shapes(list(specs.values())))
    )
    # weights over 45% of device memory are skipped
    h100 = 80 * 10**9

    def fits(spec: tb.LayerSpec) -> bool:
        return spec.weight_bytes() <= tb.MEM_FRACTION * h100

    assert fits(v3) and fits(mix) and not fits(specs["switch-c-2048"])
