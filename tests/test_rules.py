"""Cross-field rules: each problem is reported at its field with a message that says what is
wrong and how to fix it (the rules run after every section validates on its own)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from moesim.errors import ScenarioError
from moesim.loader import load_scenario

LAYER = """\
name: layer
seed: 1
cluster: dgx-h100
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop}
workload: {kind: layer, tokens: 1024}
"""

SERVING = """\
name: serving
seed: 1
cluster: {preset: dgx-h100, launch: graph}
model: mixtral-8x7b
routing: {kind: uniform}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: null, overflow: dropless}
workload:
  kind: serving
  duration_s: 60
  warmup_s: 5
  arrival: {kind: poisson, rate_per_s: 20}
  prompt_tokens: {kind: constant, value: 512}
  output_tokens: {kind: constant, value: 64}
  scheduler: {max_batch_tokens: 8192, max_seqs: 256, chunked_prefill: true, block_tokens: 16}
  slo: {ttft_ms: 500, tpot_ms: 50}
"""

#: one RTX A5000 serving Mixtral with a static expert cache, the rest in its host's DRAM
OFFLOAD = """\
name: offload
seed: 1
cluster: workstation-a5000
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 1, ep: 1}
policies:
  capacity_factor: null
  overflow: dropless
  offload: {experts: {policy: static, cache_experts: 48}}
workload:
  kind: serving
  duration_s: 60
  warmup_s: 5
  arrival: {kind: poisson, rate_per_s: 0.1}
  prompt_tokens: {kind: constant, value: 256}
  output_tokens: {kind: constant, value: 32}
  scheduler: {max_batch_tokens: 2048, max_seqs: 16, chunked_prefill: true, block_tokens: 16}
"""

TRAINING = """\
name: training
seed: 1
cluster: {preset: h100-rail, nodes: 4}
model: mixtral-8x7b
routing: {kind: dirichlet, alpha: 5.0}
parallelism: {dp: 8, pp: 4, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop}
workload:
  kind: training
  seq_len: 4096
  micro_batch_sequences: 1
  microbatches: 16
  schedule: 1f1b
  zero_stage: 1
"""

BASES = {"layer": LAYER, "serving": SERVING, "offload": OFFLOAD, "training": TRAINING}

Issues = Callable[[str, list[str]], list[tuple[str, str]]]


@pytest.fixture
def issues(tmp_path: Path) -> Issues:
    """The (field, message) of every issue of a base scenario with ``--set`` overrides."""

    def _issues(base: str, overrides: list[str]) -> list[tuple[str, str]]:
        path = tmp_path / f"{base}.yaml"
        path.write_text(BASES[base])
        with pytest.raises(ScenarioError) as info:
            load_scenario(path, overrides)
        return [(i.path, i.message) for i in info.value.issues]

    return _issues


def test_the_bases_are_valid(tmp_path: Path) -> None:
    """Every base scenario of these tests loads without an issue."""
    for name, text in BASES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        assert load_scenario(path).name == name


def _case(
    case_id: str, base: str, overrides: list[str], *expected: tuple[str, str]
) -> pytest.ParameterSet:
    return pytest.param(base, overrides, list(expected), id=case_id)


LAYOUT = [
    _case(
        "etp-divides-expert-d-ff",
        "layer",
        ["parallelism={dp: 8, ep: 8, etp: 3}"],
        ("parallelism.etp", "must divide model.expert_d_ff (14336), got 3"),
    ),
    _case(
        "placement-one-rank-per-expert",
        "layer",
        ["parallelism={dp: 8, ep: 2, placement: [0, 1, 0]}"],
        (
            "parallelism.placement",
            "an explicit placement needs one EP rank per expert (8), got 3",
        ),
    ),
    _case(
        "placement-ranks-in-range",
        "layer",
        ["parallelism={dp: 8, ep: 2, placement: [0, 1, 2, 0, 1, 0, 1, 0]}"],
        ("parallelism.placement", "EP ranks must be in [0, ep=2), got 2"),
    ),
    _case(
        "placement-balanced",
        "layer",
        ["parallelism={dp: 8, ep: 2, placement: [0, 0, 0, 0, 0, 1, 1, 1]}"],
        ("parallelism.placement", "every EP rank must hold experts/ep = 4 experts, got [5, 3]"),
    ),
    _case(
        "dtype-needs-a-peak",
        "layer",
        ["cluster=dgx-a100", "model.dtype=fp8"],
        (
            "model.dtype",
            "a100-80gb-sxm has no fp8 peak in the catalog; pick a dtype it supports",
        ),
    ),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), LAYOUT)
def test_layout_and_hardware_rules(
    issues: Issues, base: str, overrides: list[str], expected: list[tuple[str, str]]
) -> None:
    """A layout the model cannot be split by, or a dtype the device lacks, is named at its field."""
    got = issues(base, overrides)
    for item in expected:
        assert item in got, got


TWO_NODES = "cluster={preset: dgx-h100, nodes: 2, fabric: {kind: %s, nic: %s, nics_per_node: %s, switch: %s}}"

CLUSTER = [
    _case(
        "switch-required",
        "layer",
        ["cluster={preset: dgx-h100, scale_up: {kind: nvswitch, switch: null}}"],
        ("cluster.scale_up.switch", "required when scale_up.kind is 'nvswitch'"),
    ),
    _case(
        "nvswitch-needs-ports",
        "layer",
        ["cluster={preset: dgx-h100, accelerator: {preset: h100-sxm, ports: []}}"],
        ("cluster.scale_up.kind", "'nvswitch' needs accelerator ports (scale-up links)"),
    ),
    _case(
        "pcie-needs-a-host-link",
        "layer",
        [
            "cluster={preset: workstation-a5000, accelerator: {preset: rtx-a5000, host_link: null}}",
            "parallelism={dp: 1, ep: 1}",
        ],
        ("cluster.scale_up.kind", "'pcie' needs cluster.accelerator.host_link"),
    ),
    _case(
        "nodes-need-a-fabric",
        "layer",
        ["cluster={preset: dgx-h100, nodes: 2}", "parallelism={dp: 16, ep: 8}"],
        ("cluster.fabric.kind", "a cluster of 2 nodes needs a fabric, got 'none'"),
    ),
    _case(
        "fabric-needs-a-nic",
        "layer",
        [TWO_NODES % ("fat_tree", "null", 8, "ib-quantum2-ndr"), "parallelism={dp: 16, ep: 8}"],
        ("cluster.fabric.nic", "required when the fabric is not 'none'"),
    ),
    _case(
        "fabric-needs-nics",
        "layer",
        [TWO_NODES % ("fat_tree", "ib-ndr", 0, "ib-quantum2-ndr"), "parallelism={dp: 16, ep: 8}"],
        ("cluster.fabric.nics_per_node", "must be >= 1 when the fabric is not 'none'"),
    ),
    _case(
        "at-most-a-nic-per-accelerator",
        "layer",
        [TWO_NODES % ("fat_tree", "ib-ndr", 9, "ib-quantum2-ndr"), "parallelism={dp: 16, ep: 8}"],
        ("cluster.fabric.nics_per_node", "must be <= accelerators_per_node (8), got 9"),
    ),
    _case(
        "fabric-needs-a-switch",
        "layer",
        [TWO_NODES % ("fat_tree", "ib-ndr", 8, "null"), "parallelism={dp: 16, ep: 8}"],
        ("cluster.fabric.switch", "required when the fabric is not 'none'"),
    ),
    _case(
        "rail-optimized-nic-per-accelerator",
        "layer",
        [
            TWO_NODES % ("rail_optimized", "ib-ndr", 4, "ib-quantum2-ndr"),
            "parallelism={dp: 16, ep: 8}",
        ],
        (
            "cluster.fabric.nics_per_node",
            "a rail-optimized fabric needs one NIC per accelerator (8), got 4",
        ),
    ),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), CLUSTER)
def test_cluster_structure_rules(
    issues: Issues, base: str, overrides: list[str], expected: list[tuple[str, str]]
) -> None:
    """A cluster missing a switch, ports, host link, fabric, NIC or the right NIC count is named at its field."""
    got = issues(base, overrides)
    for item in expected:
        assert item in got, got


@pytest.mark.parametrize(
    ("overrides", "field", "name", "close"),
    [
        (
            [
                TWO_NODES % ("fat_tree", "ib-nd", 8, "ib-quantum2-ndr"),
                "parallelism={dp: 16, ep: 8}",
            ],
            "cluster.fabric.nic",
            "ib-nd",
            "ib-ndr",
        ),
        (
            [
                "cluster={preset: dgx-h100, accelerator: {preset: h100-sxm, host_link: pcie-gen55-x16}}"
            ],
            "cluster.accelerator.host_link",
            "pcie-gen55-x16",
            "pcie-gen5-x16",
        ),
        (
            ["cluster={preset: tpu-v3-32, link: ici-v33}", "parallelism={dp: 16, ep: 8}"],
            "cluster.link",
            "ici-v33",
            "ici-v3",
        ),
    ],
    ids=["nic", "host-link", "torus-link"],
)
def test_unknown_link_preset_suggests_the_closest(
    issues: Issues, overrides: list[str], field: str, name: str, close: str
) -> None:
    """A misspelt link name is reported at its field with the closest preset name."""
    got = issues("layer", overrides)
    (message,) = [m for f, m in got if f == field]
    assert message.startswith(f"unknown link preset {name!r} (did you mean {close!r}?)")


SERVING_RULES = [
    _case(
        "decoder-only",
        "serving",
        ["model={preset: mixtral-8x7b, architecture: encoder_decoder, encoder_layers: 16}"],
        ("model.architecture", "serving simulates decoder-only models, got encoder_decoder"),
    ),
    _case(
        "no-pipeline",
        "serving",
        ["parallelism={dp: 4, pp: 2, ep: 4}"],
        ("parallelism.pp", "serving with pipeline parallelism is not modelled, got 2"),
    ),
    _case(
        "tp-divides-heads",
        "serving",
        [
            "parallelism={dp: 1, tp: 8, ep: 8}",
            "model={preset: mixtral-8x7b, heads: 12, kv_heads: 4, head_dim: 128}",
        ],
        ("parallelism.tp", "must divide model.heads (12) to split attention, got 8"),
    ),
    _case(
        "tp-fits-kv-heads",
        "serving",
        [
            "parallelism={dp: 2, tp: 4, ep: 8}",
            "model={preset: mixtral-8x7b, heads: 48, kv_heads: 6, head_dim: 128}",
        ],
        ("parallelism.tp", "must divide model kv_heads (6) or be a multiple of it, got 4"),
    ),
    _case(
        "weights-fit",
        "serving",
        ["cluster={preset: dgx-h100, accelerator: {preset: h100-sxm, usable_memory_gib: 8}}"],
        (
            "parallelism",
            "the weights do not fit: each h100-sxm needs 13.5 GiB (10.5 GiB of experts over "
            "ep=8, 3.0 GiB of the rest over tp=1) but has 8.0 GiB; raise ep or tp, or use a "
            "larger device",
        ),
    ),
    _case(
        "a-kv-block-fits",
        "serving",
        ["workload.kv_cache_fraction=0.000001"],
        (
            "workload.kv_cache_fraction",
            "leaves no KV block: 0.000 GiB per h100-sxm for 131072 bytes per token x 16 "
            "tokens per block",
        ),
    ),
    _case(
        "expert-cache-fits-hbm",
        "serving",
        [
            "cluster={preset: dgx-h100, accelerator: {preset: h100-sxm, usable_memory_gib: 4}}",
            "policies.offload={experts: {policy: static, cache_gib: 1.5}}",
        ],
        (
            "policies.offload.experts.cache_gib",
            "the expert cache does not fit in HBM: 4 experts (+ 1 staging) x 0.328 GiB = "
            "1.6 GiB plus 3.0 GiB of other weights exceed the 4.0 GiB of each h100-sxm; use "
            "a smaller cache",
        ),
    ),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), SERVING_RULES)
def test_serving_rules(
    issues: Issues, base: str, overrides: list[str], expected: list[tuple[str, str]]
) -> None:
    """A served model that is not decoder-only, cannot be split over tp, or does not fit is named with its sizes."""
    got = issues(base, overrides)
    for item in expected:
        assert item in got, got


OFFLOAD_RULES = [
    _case(
        "layer-workload",
        "layer",
        ["policies.offload={experts: {policy: static, cache_experts: 4}}"],
        (
            "policies.offload.experts",
            "expert offloading is modelled for serving and training, not layer",
        ),
    ),
    _case(
        "optimizer-is-for-training",
        "offload",
        ["policies.offload.optimizer=true"],
        ("policies.offload.optimizer", "optimizer offloading applies to training, not serving"),
    ),
    _case(
        "needs-a-host-link",
        "offload",
        ["cluster={preset: workstation-a5000, accelerator: {preset: rtx-a5000, host_link: null}}"],
        ("cluster.accelerator.host_link", "offloading needs rtx-a5000's host link, got none"),
    ),
    _case(
        "dram-within-the-host",
        "offload",
        ["policies.offload.experts.dram_gib=4096"],
        ("policies.offload.experts.dram_gib", "exceeds the host's DRAM (128.0 GiB), got 4096.0"),
    ),
    _case(
        "rest-needs-nvme",
        "offload",
        [
            "policies.offload.experts.dram_gib=16",
            "cluster={preset: workstation-a5000, host: {nvme_read_gbps: 0}}",
        ],
        (
            "policies.offload.experts.dram_gib",
            "the 84.0 GiB of experts per host that do not all fit 16.0 GiB of DRAM need NVMe, "
            "but the host has 1.82 TiB at 0.0 GB/s",
        ),
    ),
    _case(
        "host-dram-holds-the-experts",
        "offload",
        ["cluster={preset: workstation-a5000, host: {dram_gib: 8}}"],
        (
            "policies.offload.experts",
            "host DRAM is too small for the offloaded experts: 84.0 GiB per host > dram_gib "
            "8.0 GiB; set dram_gib to keep the rest on NVMe",
        ),
    ),
    _case(
        "prefetch-needs-overlap",
        "offload",
        [
            "policies.offload.experts.prefetch={accuracy: 0.5}",
            "policies.offload.experts.overlap=false",
        ],
        (
            "policies.offload.experts.prefetch",
            "prefetching needs overlap: true (copies alongside compute)",
        ),
    ),
    _case(
        "cache-experts-per-device",
        "offload",
        ["policies.offload.experts.cache_experts=400"],
        (
            "policies.offload.experts.cache_experts",
            "400 experts is more than the 256 experts each rtx-a5000 holds (32 MoE blocks x 8: "
            "8 experts / ep 1); the cache is per device: at most 256 (which keeps every expert "
            "resident)",
        ),
    ),
    _case(
        "cache-gib-per-device",
        "offload",
        ["policies.offload.experts={policy: static, cache_gib: 900}"],
        (
            "policies.offload.experts.cache_gib",
            "900.0 GiB holds 2742 experts of 0.328 GiB, more than the 256 experts each "
            "rtx-a5000 holds (32 MoE blocks x 8: 8 experts / ep 1); the cache is per device: "
            "at most 84.00 GiB (which keeps every expert resident)",
        ),
    ),
    _case(
        "cache-holds-an-expert",
        "offload",
        ["policies.offload.experts={policy: static, cache_gib: 0.01}"],
        (
            "policies.offload.experts.cache_gib",
            "holds no whole expert (an expert is 0.328 GiB on each rtx-a5000), got 0.01 GiB",
        ),
    ),
    _case(
        "training-needs-zero-offload",
        "training",
        ["policies.offload={experts: {policy: static, cache_experts: 2}}"],
        (
            "policies.offload.optimizer",
            "expert offloading in training keeps the streamed experts' optimizer states and "
            "their update on the host: set optimizer: true (ZeRO-Offload)",
        ),
    ),
    _case(
        "training-streams-without-prefetch-or-nvme",
        "training",
        [
            "policies.offload={optimizer: true, experts: {policy: static, cache_experts: 2, "
            "prefetch: {accuracy: 0.5}, dram_gib: 100}}"
        ],
        (
            "policies.offload.experts.prefetch",
            "training uses every expert each pass: nothing to predict",
        ),
        (
            "policies.offload.experts.dram_gib",
            "the NVMe tier is modelled for serving; training streams from DRAM",
        ),
    ),
    _case(
        "optimizer-states-fit-the-host",
        "training",
        [
            "policies.offload={optimizer: true}",
            "cluster={preset: h100-rail, nodes: 4, host: {dram_gib: 16}}",
        ],
        (
            "policies.offload.optimizer",
            "the optimizer states of a host's devices (130.5 GiB) do not fit its 16.0 GiB of DRAM",
        ),
    ),
    _case(
        "streamed-experts-fit-the-host",
        "training",
        [
            "parallelism={dp: 32, ep: 1}",
            "policies.offload={optimizer: true, experts: {policy: static, cache_experts: 1}}",
            "cluster={preset: h100-rail, nodes: 4, host: {dram_gib: 500}}",
        ],
        (
            "policies.offload.experts",
            "host DRAM is too small for the streamed experts: 648.4 GiB per host > 500.0 GiB",
        ),
    ),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), OFFLOAD_RULES)
def test_offload_rules(
    issues: Issues, base: str, overrides: list[str], expected: list[tuple[str, str]]
) -> None:
    """Offloading that the workload, host link, host DRAM/NVMe or device cache cannot support is named with its sizes."""
    got = issues(base, overrides)
    for item in expected:
        assert item in got, got


ONE_FAILURE = "{kind: scheduled, device: 3, at_s: 1}"

FAILURE_RULES = [
    _case(
        "not-for-layers",
        "layer",
        [f"failures={{devices: [{ONE_FAILURE}]}}"],
        ("failures", "failures apply to serving and training workloads, not 'layer'"),
    ),
    _case(
        "devices-exist",
        "serving",
        [
            "failures={devices: [{kind: scheduled, device: 8, at_s: 1}, {kind: exponential, "
            "mtbf_hours: 1, devices: [0, 9]}], links: [{device: 10, link: nic, at_s: 1, down: "
            "true}], stragglers: [{device: 11, slowdown: 2}]}"
        ],
        ("failures.devices[0].device", "device 8 does not exist: the cluster has devices 0..7"),
        (
            "failures.devices[1].devices[1]",
            "device 9 does not exist: the cluster has devices 0..7",
        ),
        ("failures.links[0].device", "device 10 does not exist: the cluster has devices 0..7"),
        ("failures.links[0].link", "'nic' needs a cluster with a fabric (NICs)"),
        (
            "failures.stragglers[0].device",
            "device 11 does not exist: the cluster has devices 0..7",
        ),
    ),
    _case(
        "events-within-the-run",
        "serving",
        [
            f"failures={{devices: [{ONE_FAILURE}], links: [{{device: 1, link: scale_up, at_s: "
            "61, down: true}], stragglers: [{device: 1, slowdown: 2, from_s: 60}]}"
        ],
        (
            "failures.links[0].at_s",
            "the link event at 61 s starts at or after the end of the run (workload.duration_s "
            "= 60 s): it would never happen; schedule it earlier or lengthen the run",
        ),
        (
            "failures.stragglers[0].from_s",
            "the straggler at 60 s starts at or after the end of the run (workload.duration_s "
            "= 60 s): it would never happen; schedule it earlier or lengthen the run",
        ),
    ),
    _case(
        "no-second-failure-at-once",
        "serving",
        [f"failures={{devices: [{ONE_FAILURE}, {ONE_FAILURE}]}}"],
        (
            "failures.devices[1].at_s",
            "device 3 is already down at 1 s: failures.devices[0] fails it at 1 s at the same time",
        ),
    ),
    _case(
        "no-failure-of-a-dead-device",
        "serving",
        [f"failures={{devices: [{ONE_FAILURE}, {{kind: scheduled, device: 3, at_s: 5}}]}}"],
        (
            "failures.devices[1].at_s",
            "device 3 is already down at 5 s: failures.devices[0] fails it at 1 s and no "
            "repair_s or hot spare brings it back",
        ),
    ),
    _case(
        "replica-count-within-experts",
        "serving",
        [f"failures={{devices: [{ONE_FAILURE}], recovery: {{replicas: 9}}}}"],
        ("failures.recovery.replicas", "must be <= model.experts (8), got 9"),
    ),
    _case(
        "checkpoint-is-for-training",
        "serving",
        [f"failures={{devices: [{ONE_FAILURE}], checkpoint: {{interval_s: 60}}}}"],
        ("failures.checkpoint", "checkpoint-restart applies to training workloads"),
    ),
    _case(
        "replica-policy-needs-replicas",
        "serving",
        [f"failures={{devices: [{ONE_FAILURE}], recovery: {{on_expert_loss: replica}}}}"],
        (
            "failures.recovery.replicas",
            "on_expert_loss 'replica' needs replicas: a count of the most popular experts or a "
            "list of expert ids",
        ),
    ),
    _case(
        "replicas-need-two-ep-ranks",
        "serving",
        [
            "failures={devices: [{kind: scheduled, device: 0, at_s: 1}], recovery: {replicas: 2}}",
            "cluster=single-h200",
            "parallelism={dp: 1, ep: 1}",
        ],
        (
            "failures.recovery.replicas",
            "a replica lives on the next EP rank: needs parallelism.ep >= 2, got 1",
        ),
    ),
    _case(
        "replicas-fit",
        "serving",
        [
            f"failures={{devices: [{ONE_FAILURE}], recovery: {{replicas: 8}}}}",
            "cluster={preset: dgx-h100, accelerator: {preset: h100-sxm, usable_memory_gib: 20}}",
        ],
        (
            "failures.recovery.replicas",
            "the replicas do not fit: 1 replica expert(s) per device take 10.5 GiB on top of "
            "13.5 GiB of weights, and each h100-sxm has 20.0 GiB (no room left for a KV block); "
            "replicate fewer experts or raise ep",
        ),
    ),
    _case(
        "training-needs-a-duration",
        "training",
        [f"failures={{devices: [{ONE_FAILURE}]}}"],
        (
            "workload.duration_s",
            "required with a failures section: the length of the training run, seconds",
        ),
    ),
    _case(
        "training-restarts-not-replicas",
        "training",
        [
            f"failures={{devices: [{ONE_FAILURE}], recovery: {{replicas: 2}}}}",
            "workload.duration_s=100",
        ],
        (
            "failures.recovery.replicas",
            "a training job restarts from its checkpoint after any failure; expert replicas "
            "apply to serving",
        ),
    ),
    _case(
        "checkpoints-need-nvme",
        "training",
        [
            f"failures={{devices: [{ONE_FAILURE}], checkpoint: {{interval_s: 60}}}}",
            "workload.duration_s=100",
            "cluster={preset: h100-rail, nodes: 4, host: {nvme_write_gbps: 0}}",
        ],
        (
            "failures.checkpoint.write_gbps",
            "required: the cluster's hosts have no NVMe to write checkpoints to "
            "(host.nvme_write_gbps is 0)",
        ),
    ),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), FAILURE_RULES)
def test_failure_rules(
    issues: Issues, base: str, overrides: list[str], expected: list[tuple[str, str]]
) -> None:
    """Failures naming missing devices, events after the run, or recovery the workload cannot use are named at their field."""
    got = issues(base, overrides)
    for item in expected:
        assert item in got, got


def test_replica_list_naming_a_missing_expert_is_a_located_error(issues: Issues) -> None:
    """A replica list naming an expert the model lacks is a located error at that list entry."""
    got = issues(
        "serving", [f"failures={{devices: [{ONE_FAILURE}], recovery: {{replicas: [1, 9]}}}}"]
    )
    assert (
        "failures.recovery.replicas[1]",
        "expert 9 does not exist: the model has experts 0..7",
    ) in got
