"""KV cache transfer from a prefill to a decode instance (issue 16, part 2 foundation):
bytes from the model's KV shape (MLA's compressed latent) and the time over the topology,
checked in closed form."""

from __future__ import annotations

import pytest

from moesim.engine.kv_transfer import kv_transfer_bytes, kv_transfer_s
from moesim.loader import scenario_from_dict
from moesim.system import build_system


def _system(model: str, nodes: int = 2):
    return build_system(
        scenario_from_dict(
            {
                "name": "kv",
                "seed": 1,
                "cluster": {"preset": "h800-rail", "nodes": nodes},
                "model": model,
                "routing": {"kind": "uniform"},
                "parallelism": {"dp": 8 * nodes, "ep": 8 * nodes}
                if model == "deepseek-v3"
                else {"dp": 4 * nodes, "tp": 2, "ep": 8},
                "policies": {"capacity_factor": None, "overflow": "dropless"},
                "workload": {"kind": "layer", "tokens": 64},
            }
        )
    )


def test_mla_kv_bytes_are_the_compressed_latent() -> None:
    """DeepSeek-V3 (config.json: 61 layers, kv_lora_rank 512, qk_rope_head_dim 64, fp8 KV
    at one byte per value in moesim's fp8 model): 61 x (512 + 64) = 35,136 bytes per
    token, whatever the tensor parallelism (the latent is whole on every device)."""
    m = _system("deepseek-v3").scenario.model
    assert kv_transfer_bytes(m, 1, 1) == 61 * (512 + 64) * m.bytes_per_param
    assert kv_transfer_bytes(m, 4096, 8) == 4096 * 61 * 576 * m.bytes_per_param


def test_cross_node_transfer_time_in_closed_form() -> None:
    """A 4096-token DeepSeek-V3 prompt from GPU 0 (node 0) to GPU 8 (node 1) over the rail
    (ConnectX-7 NDR, 50 GB/s per direction; catalog links.yaml): latency + bytes / 50 GB/s;
    inside a node over NVLink it is faster."""
    system = _system("deepseek-v3")
    m, paths = system.scenario.model, system.paths
    nbytes = 4096 * 61 * 576 * m.bytes_per_param
    got = kv_transfer_s(paths, m, 4096, [0], [8])
    assert got == pytest.approx(paths.latency_s(0, 8) + nbytes / 50e9, rel=1e-12)
    assert 0.0 < paths.latency_s(0, 8) < 20e-6
    assert kv_transfer_s(paths, m, 4096, [0], [1]) < got / 2
    assert kv_transfer_s(paths, m, 4096, [0], [0]) == 0.0


def test_gqa_shards_move_in_parallel() -> None:
    """Mixtral (8 KV heads of 128, bf16) prefilled on a tp=2 rank: each device holds 4
    heads and sends them to its peer at once; the time is one shard's, half the bytes of
    the whole KV over the same rail rate."""
    system = _system("mixtral-8x7b")
    m, paths = system.scenario.model, system.paths
    shard = kv_transfer_bytes(m, 1000, 2)
    assert shard == 32 * 1000 * 2 * 4 * 128 * 2
    got = kv_transfer_s(paths, m, 1000, [0, 1], [8, 9])
    lat = max(paths.latency_s(0, 8), paths.latency_s(1, 9))
    assert got == pytest.approx(lat + shard / 50e9, rel=1e-12)


def test_kv_shards_follow_the_decode_tensor_parallelism() -> None:
    """Prefill tp 1 to decode tp 2: both decode devices receive their shard (none is
    dropped); the time is that of the slower of the two routes for a tp-2 shard."""
    from moesim.engine.kv_transfer import kv_route

    system = _system("mixtral-8x7b")
    m, paths = system.scenario.model, system.paths
    route = kv_route(paths, [0], [8, 9])
    assert kv_transfer_s(paths, m, 1000, [0], [8, 9]) == pytest.approx(
        route.time_s(kv_transfer_bytes(m, 1000, 2))
    )
    assert kv_transfer_s(paths, m, 1000, [0], [8, 9]) < kv_transfer_s(paths, m, 1000, [0], [8])
