"""Every example scenario validates and runs (at a reduced size, to keep CI quick)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moesim

SCENARIOS = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.yaml"))


def test_there_are_examples() -> None:
    """The repository ships example scenarios, the quickstart among them."""
    assert "quickstart.yaml" in {p.name for p in SCENARIOS}


def _kind(path: Path) -> str:
    return str(moesim.load_scenario(str(path)).workload.kind)


LAYER = [p for p in SCENARIOS if _kind(p) == "layer"]
SERVING = [p for p in SCENARIOS if _kind(p) == "serving"]
TRAINING = [p for p in SCENARIOS if _kind(p) == "training"]

#: reduced sizes for CI: fewer, shorter micro-batches (every cluster at its full size: the
#: 512-chip GLaM slice's EP-64 all-to-alls are priced in batches, see docs/performance.md)
TRAINING_CI = [
    "workload.seq_len=256",
    "workload.micro_batch_sequences=1",
    "workload.microbatches=4",
]
SMALLER_CLUSTER: dict[str, list[str]] = {}
#: offloaded serving takes about a second per token: more, shorter requests so some finish
SERVING_CI = {
    # EP 32 over 4 nodes pays the measured all-to-all alpha: ~30 ms TPOT, so an output of
    # the distribution's max (2048 tokens) could not finish within the 20 s drain cap
    "deepseek-v3-serving-h800": ["workload.output_tokens.max=256"],
    # prefill/decode pools at EP32 and EP144 (30 nodes): a few short requests
    "deepseek-v3-production-h800": [
        "workload.arrival.rate_per_s=10",
        "workload.output_tokens.max=64",
    ],
    # ~16 ms TPOT: a 4,096-token output could not finish within the 20 s drain cap
    "mixtral-pd-h100-rail": ["workload.output_tokens.max=512"],
    "mixtral-offload-a5000": [
        "workload.arrival.rate_per_s=2",
        "workload.prompt_tokens.mean=64",
        "workload.output_tokens.mean=4",
        "workload.output_tokens.max=8",
        "workload.duration_s=5",
    ],
    # the shipped failures happen at 20-56 s: one early device failure instead
    "mixtral-serving-failure-dgx-h100": [
        "failures.devices=[{kind: scheduled, device: 3, at_s: 1}]",
        "failures.links=[]",
        "failures.stragglers=[]",
    ],
}


def test_there_are_training_examples() -> None:
    """Training has examples on GPUs (multi-node H100) and TPUs (v3 and v4 slices)."""
    names = {p.stem for p in TRAINING}
    assert {"mixtral-training-h100", "switch-base-training-tpu-v3", "glam-training-tpu-v4"} <= names


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_training_example_runs(path: Path) -> None:
    """The training example runs at a reduced size; its breakdown adds up to the step."""
    s = moesim.load_scenario(str(path), [*TRAINING_CI, *SMALLER_CLUSTER.get(path.stem, [])])
    summary = moesim.run(s).summary
    assert summary["step_time_ms"] > 0 and 0 < summary["mfu"] < 1
    assert sum(summary["breakdown_ms"].values()) == pytest.approx(summary["step_time_ms"], abs=1e-4)
    assert all(v >= 0 for v in summary["breakdown_ms"].values())


def test_there_is_a_serving_example() -> None:
    """The serving workload has an example scenario."""
    assert SERVING


#: serving examples that take over half a minute of CPU even reduced: run by .ci/run only
SLOW_SERVING = {"deepseek-v3-serving-h800", "deepseek-v3-production-h800"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_SERVING else p for p in SERVING],
    ids=lambda p: p.stem,
)
def test_serving_example_runs(path: Path) -> None:
    """The serving example runs at a reduced duration and serves every measured request."""
    ci = ["workload.duration_s=2", "workload.warmup_s=0.5", *SERVING_CI.get(path.stem, [])]
    s = moesim.load_scenario(str(path), ci)
    summary = moesim.run(s).summary
    assert summary["completed_requests"] == summary["measured_requests"] > 0
    assert summary["throughput_tokens_per_s"] > 0 and summary["drained"]


@pytest.mark.parametrize("path", LAYER, ids=lambda p: p.stem)
def test_example_runs(path: Path) -> None:
    """The example loads, runs, and conserves its token-choice slots."""
    s = moesim.load_scenario(str(path), ["workload.tokens=2048"])
    summary = moesim.run(s).summary
    assert summary["time_ms"] > 0
    assert summary["processed_slots"] + summary["dropped_tokens"] == 2048 * s.model.top_k
    assert sum(summary["breakdown_ms"].values()) == pytest.approx(summary["time_ms"], abs=1e-5)
    assert all(v >= 0 for v in summary["breakdown_ms"].values()), summary["breakdown_ms"]
