"""The MoE layer as a launch pipeline (moesim.cost.compute.LaunchPipeline, moe_layer_s): kernel
counts from the model's structure, eager host issue overlapping device work, CUDA-graph
replays without host cost, per-expert loops after a host read; and the layer simulation
adding up to it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim import catalog
from moesim.catalog.hardware import accelerator
from moesim.config.model import ModelConfig
from moesim.config.profile import DeviceProfile, GemmFit, LaunchFit
from moesim.config.scenario import Scenario
from moesim.cost.compute import Roofline, activation_kernels, flow_shop_s
from moesim.engine.layer_sim import layer_tokens, simulate_routed_layer
from moesim.loader import scenario_from_dict
from moesim.routing.route import LayerRouting
from moesim.system import build_system

H200 = accelerator("h200-sxm")
US = 1e-6

#: round numbers, so that expected times can be written down by hand
FIT = LaunchFit(
    device_gemm=GemmFit(
        flops_per_s=500e12, bytes_per_s=4e12, overhead_us=5.0, smoothness=1e9, m_tile=1
    ),
    product_host_us=20.0,
    grouped_host_us=30.0,
    kernel_device_us=2.0,
    eager_device_us=1.0,
    glue_kernels=18,
    glue_host_us=150.0,
    loop_product_host_us=15.0,
    host_sync_us=10.0,
    source="test values",
)


def _profile(fit: LaunchFit | None = FIT, **launch: float) -> DeviceProfile:
    base = H200.profile
    assert base is not None
    if fit is not None and launch:
        fit = fit.model_copy(update=launch)
    return base.model_copy(update={"launch": fit, "kernel_overhead_us": 6.0})


def _roofline(launch: str = "eager", profile: DeviceProfile | None = None) -> Roofline:
    return Roofline.of(H200, "bf16", 2, profile or _profile(), launch)


def _model(name: str) -> ModelConfig:
    return ModelConfig.model_validate(catalog.raw_preset("models", name))


# -- the flow shop of host issue and device work ---------------------------------------


def test_flow_shop_of_equal_jobs_is_the_slower_stage_plus_the_faster_once() -> None:
    """n equal jobs: n x the bottleneck plus one job of the other stage."""
    h, d = np.full(5, 3.0), np.full(5, 7.0)
    assert flow_shop_s(h, d) == pytest.approx(5 * 7.0 + 3.0)
    assert flow_shop_s(d, h) == pytest.approx(5 * 7.0 + 3.0)
    assert flow_shop_s(np.array([]), np.array([])) == 0.0


def test_flow_shop_is_between_the_stages_max_and_their_sum() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        h, d = rng.uniform(0, 10, 8), rng.uniform(0, 10, 8)
        t = flow_shop_s(h, d)
        assert max(h.sum(), d.sum()) <= t <= h.sum() + d.sum()
        assert t >= h.sum() + d[-1] - 1e-12 and t >= h[0] + d.sum() - 1e-12


# -- kernel counts from the model's structure ------------------------------------------


def test_kernel_counts_follow_the_structure() -> None:
    """Gated activations run two elementwise kernels (function, product), others one; top-k
    above 1 sorts each token's choices (one more glue kernel)."""
    assert activation_kernels("swiglu") == activation_kernels("geglu") == 2
    assert activation_kernels("relu") == activation_kernels("gelu") == 1
    pl = _roofline().pipeline
    assert pl is not None
    assert pl.glue_kernel_count(1) == 18 and pl.glue_kernel_count(8) == 19


def test_graph_replay_is_device_time_only() -> None:
    """A CUDA-graph layer costs no host issue: every host figure can change without effect,
    and one more device time per kernel adds exactly the layer's kernel count."""
    m = _model("olmoe-1b-7b")
    loads = np.full(8, 1.0)
    base = _roofline("graph").moe_layer_s(loads, 1, 8, m, m.expert_d_ff)
    hosts = _profile(glue_host_us=1e4, product_host_us=1e3, grouped_host_us=1e3)
    assert _roofline("graph", hosts).moe_layer_s(loads, 1, 8, m, m.expert_d_ff) == base
    more = _roofline("graph", _profile(kernel_device_us=3.0))
    # glue (18 + top-k sort) + gather + scatter + silu and product: the non-product kernels
    per_us = (more.moe_layer_s(loads, 1, 8, m, m.expert_d_ff) - base) / US
    assert per_us == pytest.approx(19 + 2 + 2)


def test_shared_experts_add_their_products_and_kernels() -> None:
    """Shared experts add two products, their activation's kernels and the sum of outputs."""
    qwen = _model("qwen1.5-moe-a2.7b")
    bare = qwen.model_copy(update={"shared_experts": 0})
    loads = np.full(4, 1.0)
    rf = _roofline("graph")
    extra = rf.moe_layer_s(loads, 1, 4, qwen, qwen.expert_d_ff) - rf.moe_layer_s(
        loads, 1, 4, bare, bare.expert_d_ff
    )
    pl = rf.pipeline
    assert pl is not None
    dev, width, d = pl.device, qwen.shared_d_ff * qwen.shared_experts, qwen.d_model
    products = float(dev.gemm_s(1, d, 2 * width) + dev.gemm_s(1, width, d))
    kernels = (activation_kernels(qwen.activation) + 1) * pl.floor_s
    traffic = (5 * width + 3 * d) * 2 / dev.memory_bytes_per_s  # silu, x, y + s
    assert extra == pytest.approx(products + kernels + traffic, rel=1e-9)


# -- eager: host issue overlaps device work ----------------------------------------------


def test_eager_few_tokens_are_host_bound() -> None:
    """Small experts, one token: the layer is its host issue, so every microsecond of glue
    issue adds one; the device's kernel time does not show."""
    m = _model("olmoe-1b-7b")
    loads = np.full(8, 1.0)
    rf = _roofline()
    t = rf.moe_layer_s(loads, 1, 8, m, m.expert_d_ff)
    host = (150 + 20 + 2 * 6 + 2 * 30 + 2 * 6) * US  # glue, router, gather/scatter, experts
    assert t == pytest.approx(host)
    later = _roofline(profile=_profile(glue_host_us=160.0))
    assert later.moe_layer_s(loads, 1, 8, m, m.expert_d_ff) - t == pytest.approx(10 * US)
    slower_device = _roofline(profile=_profile(kernel_device_us=3.0))
    assert slower_device.moe_layer_s(loads, 1, 8, m, m.expert_d_ff) == pytest.approx(t)


def test_eager_many_tokens_are_device_bound() -> None:
    """Large experts: the layer is its device time, eager launches adding their extra
    device time per kernel over a graph replay; host issue hides behind it."""
    m = _model("mixtral-8x7b")
    loads = np.full(8, 512.0)
    eager, graph = _roofline(), _roofline("graph")
    t_eager = eager.moe_layer_s(loads, 2048, 4096, m, m.expert_d_ff)
    t_graph = graph.moe_layer_s(loads, 2048, 4096, m, m.expert_d_ff)
    # non-product kernels: 19 glue + gather + scatter + 2 activation kernels, 1 us each
    assert t_eager - t_graph == pytest.approx(23 * US)
    hosts = _roofline(profile=_profile(glue_host_us=300.0))
    assert hosts.moe_layer_s(loads, 2048, 4096, m, m.expert_d_ff) == pytest.approx(t_eager)


def test_eager_layer_is_never_more_than_host_plus_device() -> None:
    m = _model("deepseek-v2-lite")
    eager, graph = _roofline(), _roofline("graph")
    for tokens in (1, 16, 256, 4096):
        loads = np.full(64, tokens * m.top_k / 64)
        t = eager.moe_layer_s(loads, tokens, tokens * m.top_k, m, m.expert_d_ff)
        g = graph.moe_layer_s(loads, tokens, tokens * m.top_k, m, m.expert_d_ff)
        assert g <= t <= g + 1e-3  # device part at least; host adds under a millisecond


# -- per-expert loops: a host read, then one expert's kernels after another ----------------


def test_loop_of_small_experts_costs_its_issue_per_touched_expert() -> None:
    """Host-bound loop: each touched expert adds its products' and kernels' issue time."""
    m = _model("olmoe-1b-7b")
    rf = _roofline()
    per_expert = (20 + 15 + 2 * 6) * US  # up product, down product into a slice, silu, x
    times = [rf.moe_layer_s(np.full(n, 1.0), 8, 8, m, m.expert_d_ff, "loop") for n in (8, 16, 32)]
    assert times[1] - times[0] == pytest.approx(8 * per_expert)
    assert times[2] - times[1] == pytest.approx(16 * per_expert)
    assert times[0] == pytest.approx(10 * US + 8 * per_expert + (150 + 20 + 2 * 6) * US)


def test_loop_of_large_experts_is_their_device_time() -> None:
    """Device-bound loop: the host issues the first expert, the device runs every one."""
    m = _model("mixtral-8x7b")
    rf = _roofline()
    pl = rf.pipeline
    assert pl is not None
    loads = np.full(8, 256.0)
    t = rf.moe_layer_s(loads, 1024, 2048, m, m.expert_d_ff, "loop")
    graph = _roofline("graph").moe_layer_s(loads, 1024, 2048, m, m.expert_d_ff, "loop")
    first = pl.product_host_s + pl.loop_product_host_s + 2 * pl.kernel_host_s
    eager_extra = (19 + 2 + 8 * 2) * 1.0 * US  # eager device time of the non-product kernels
    assert t == pytest.approx(pl.host_sync_s + first + graph + eager_extra)


# -- the layer simulation adds up to the pipeline ------------------------------------------


def _scenario(model: str, tokens: int, kernel: str, launch: str, ep: int = 1) -> Scenario:
    data = {
        "name": "t",
        "seed": 1,
        "cluster": {
            "preset": "single-h200" if ep == 1 else "dgx-h200",
            "profile": _profile().model_dump(mode="json"),
            "expert_kernel": kernel,
            "launch": launch,
        },
        "model": model,
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": ep, "ep": ep},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {"kind": "layer", "tokens": tokens},
    }
    return scenario_from_dict(data)


@pytest.mark.parametrize("model", ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "switch-base-128"])
@pytest.mark.parametrize(
    ("kernel", "launch"), [("grouped", "eager"), ("grouped", "graph"), ("loop", "eager")]
)
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_single_device_layer_time_is_the_pipeline(
    model: str, kernel: str, launch: str, tokens: int
) -> None:
    """One device, all experts local: the simulated layer (gate, shared experts, experts,
    combine as separate steps) takes exactly the pipeline's time."""
    s = _scenario(model, tokens, kernel, launch)
    system = build_system(s)
    m = s.model
    rng = np.random.default_rng(tokens)
    counts = np.bincount(
        np.concatenate([rng.choice(m.experts, m.top_k, replace=False) for _ in range(tokens)]),
        minlength=m.experts,
    )
    routing = LayerRouting(
        tokens_per_rank=np.array([layer_tokens(s)]),
        counts=counts[None, :].astype(np.int64),
        dropped=0,
        rerouted=0,
        fully_dropped=0,
        capacity=None,
    )
    simulated = simulate_routed_layer(system, routing).time_s
    loads = counts[counts > 0].astype(float)
    rf = system.layer_costs.roofline
    expected = rf.moe_layer_s(loads, tokens, int(loads.sum()), m, m.expert_d_ff, kernel)
    assert simulated == pytest.approx(expected, rel=1e-12)


def test_expert_parallel_layers_cost_more_with_more_tokens() -> None:
    """With expert parallelism the experts' step is a pipeline of its own (all-to-alls
    separate the steps), so a layer never gets cheaper with more tokens."""
    from moesim.engine.layer_sim import simulated_layer_cost

    cost = simulated_layer_cost(build_system(_scenario("mixtral-8x7b", 8, "grouped", "eager", 8)))
    times = [cost.time_s(n) for n in (1, 8, 64, 512, 4096)]
    assert all(b >= a for a, b in itertools.pairwise(times)), times


def test_routing_glue_in_a_pipeline() -> None:
    """The gate's glue: its kernels' device time in a graph; eagerly at least its issue."""
    m = _model("olmoe-1b-7b")
    graph, eager = _roofline("graph"), _roofline()
    traffic = 2 * 4 * 4 * m.experts / graph.memory_bytes_per_s  # fp32 scores, read + write
    assert graph.routing_s(4, m.experts, m.top_k) == pytest.approx(traffic + 19 * 2.0 * US)
    assert eager.routing_s(4, m.experts, m.top_k) > 150 * US
    assert graph.routing_s(0, m.experts, m.top_k) == 0.0


def test_profiles_without_a_launch_fit_keep_the_per_layer_glue() -> None:
    """No launch fit: the old model (glue time per layer, per-kernel launch costs)."""
    old = _profile(None).model_copy(update={"layer_overhead_us": 100.0})
    rf = Roofline.of(H200, "bf16", 2, old, "eager")
    assert rf.pipeline is None
    m = _model("olmoe-1b-7b")
    loads = np.full(8, 1.0)
    plain = rf.grouped_ffn_s(loads, m.d_model, m.expert_d_ff, m.activation)
    assert rf.grouped_ffn_s(loads, m.d_model, m.expert_d_ff, m.activation, model=m) == plain
    with pytest.raises(ValueError, match="launch fit"):
        rf.moe_layer_s(loads, 1, 8, m, m.expert_d_ff)


def test_glue_kernel_count_is_what_the_profiler_lists() -> None:
    """The glue count and the per-structure counts match ``torch.profiler``'s listing of the
    measured layer on an H200 (moesim/catalog/measurements/h200_moe_kernels_2026-12-03.jsonl,
    ``python3 -m moesim.calibrate.torch_kernels``, torch 2.11.0+cu130), cuBLAS's split-K
    reductions and workspace fills aside (part of a product, whose device time the GEMM
    fit measures)."""
    from importlib import resources

    from moesim.calibrate.launch_fit import GLUE_KERNELS
    from moesim.calibrate.records import of_kind, read

    path = resources.files("moesim.catalog") / "measurements" / "h200_moe_kernels_2026-12-03.jsonl"
    recs = [r for r in of_kind(read(str(path)), "kernel_count") if r["tokens"] > 1]
    assert {r["model"] for r in recs} >= {"olmoe-1b-7b", "switch-base-128", "qwen1.5-moe-a2.7b"}

    def kernels(r: dict, stage: str) -> int:
        helpers = ("splitKreduce", "Memset")
        return sum(not any(h in n for h in helpers) for n in r[f"{stage}_names"])

    checked = 0
    for r in recs:
        m = _model(r["model"])
        if r["tokens"] * m.top_k > 4096:  # larger sorts run cub's multi-pass radix sort
            continue
        glue = GLUE_KERNELS + (1 if m.top_k > 1 else 0)
        # router product, gather, scatter besides the glue
        assert kernels(r, "router") + kernels(r, "permute") + kernels(r, "combine") == glue + 3
        # per grouped product: a setup kernel and the product; the activation's kernels
        assert kernels(r, "experts_grouped") == 2 * 2 + activation_kernels(m.activation)
        if m.shared_experts:
            assert kernels(r, "shared") == 2 + activation_kernels(m.activation)
        checked += 1
    assert checked >= 10
