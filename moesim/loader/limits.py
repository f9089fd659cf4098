"""Resource bounds checked at load time, so that a scenario which would exhaust memory or run
for hours is a located error before anything is simulated.

Each bound says what it limits and why. They are far above every shipped scenario (the
largest routes 262,144 tokens per MoE layer, on 512 devices) and can be lifted, for people who
mean it, with ``--no-limits`` (``load_scenario(..., limits=False)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload, TraceArrival
from moesim.config.training import TrainingWorkload
from moesim.config.workload import LayerWorkload

GIB = 1024**3


@dataclass(frozen=True)
class Limit:
    """One bound: the largest value allowed and why it exists."""

    value: int
    why: str


ROUTED_TOKENS = Limit(
    1 << 22,
    "every routed token's expert choices are sampled and assigned in memory, about "
    "100 bytes per token and choice",
)
EXPERTS = Limit(16_384, "per-expert tables (loads, placement, popularity per layer)")
BALANCER_SAMPLES = Limit(
    500_000_000,
    "the load balancer samples statistics_tokens x experts routing scores per MoE layer",
)
DEVICES = Limit(
    4_096, "the topology's path table and the all-to-all grow with the square of the devices"
)
PIPELINE_MICROBATCHES = Limit(
    1_000_000, "the pipeline simulation has a few events per micro-batch, stage and step"
)
REQUESTS = Limit(2_000_000, "the serving simulation keeps every request and steps every iteration")
TRAINING_RUN_S = Limit(
    366 * 86_400,
    "a training run's failures are drawn over its whole duration before it is played",
)
TRAINING_RUN_EVENTS = Limit(
    1_000_000, "a training run is played failure by failure and checkpoint by checkpoint"
)
SIM_MEMORY = Limit(
    8 * GIB, "the simulation's own memory (routing samples, path table, request tables)"
)
OVERRIDE = "(--no-limits lifts the bounds for people who mean it)"


def check(scenario: Scenario) -> list[tuple[str, str]]:
    """(field path, message) for every bound the scenario exceeds."""
    out: list[tuple[str, str]] = []

    def over(path: str, what: str, value: float, limit: Limit) -> None:
        if value > limit.value:
            out.append(
                (
                    path,
                    f"{what} is {value:,.0f}, over the limit of {limit.value:,}: "
                    f"{limit.why} {OVERRIDE}",
                )
            )

    s = scenario
    devices = s.cluster.devices
    over("cluster", "the number of devices", devices, DEVICES)
    over("model.experts", "the number of experts", s.model.experts, EXPERTS)
    routed, at = routed_tokens(s)
    over(at, "the tokens one MoE layer routes at once", routed, ROUTED_TOKENS)
    replicas = s.policies.experts
    if replicas.redundant and replicas.statistics_tokens:
        over(
            "policies.experts.statistics_tokens",
            "statistics_tokens x experts x MoE layers",
            replicas.statistics_tokens * s.model.experts * len(s.model.moe_layer_indices),
            BALANCER_SAMPLES,
        )
    w = s.workload
    if isinstance(w, TrainingWorkload):
        stages = s.parallelism.pp * w.microbatches * w.steps
        over(
            "workload.microbatches",
            "micro-batches x pipeline stages x steps",
            stages,
            PIPELINE_MICROBATCHES,
        )
    if isinstance(w, TrainingWorkload) and w.duration_s is not None:
        over("workload.duration_s", "the training run's duration_s", w.duration_s, TRAINING_RUN_S)
        over(
            "workload.duration_s",
            "the expected failures and time-based checkpoints of the run",
            run_events(s, w.duration_s),
            TRAINING_RUN_EVENTS,
        )
    if isinstance(w, ServingWorkload):
        what, n = requests(w)
        over("workload.duration_s" if what else "workload.arrival", what, n, REQUESTS)
    if not out:
        need = memory_estimate(s)
        if need > SIM_MEMORY.value:
            out.append(
                (
                    "",
                    f"the simulation would need about {need / GIB:,.1f} GiB, over the limit of "
                    f"{SIM_MEMORY.value // GIB} GiB: {SIM_MEMORY.why} {OVERRIDE}",
                )
            )
    return out


def routed_tokens(s: Scenario) -> tuple[int, str]:
    """The most tokens one MoE layer routes at once, and the field that sets it."""
    w = s.workload
    dp = s.parallelism.dp
    if isinstance(w, LayerWorkload):
        return w.tokens, "workload.tokens"
    if isinstance(w, TrainingWorkload):
        return w.seq_len * w.micro_batch_sequences * dp, "workload.seq_len"
    if isinstance(w, ServingWorkload):
        return w.scheduler.max_batch_tokens * dp, "workload.scheduler.max_batch_tokens"
    return 0, ""  # pragma: no cover - every kind is listed


def run_events(s: Scenario, duration_s: float) -> float:
    """Expected failures (exponential and Weibull processes, by their MTBF) plus
    checkpoints taken every ``interval_s`` over a training run of ``duration_s``."""
    f = s.failures
    if f is None:
        return 0.0
    rate = 0.0
    for p in f.devices:
        mtbf = getattr(p, "mtbf_hours", None)
        if isinstance(mtbf, int | float) and mtbf > 0:
            devices = getattr(p, "devices", None)
            n = s.cluster.devices if devices is None else len(set(devices))
            rate += n / (mtbf * 3600.0)
    ck = f.checkpoint
    checkpoints = duration_s / ck.interval_s if ck is not None and ck.interval_s else 0.0
    return duration_s * rate + checkpoints


def requests(w: ServingWorkload) -> tuple[str, float]:
    """What bounds the request count of a serving run, and the count."""
    a = w.arrival
    if isinstance(a, TraceArrival):
        return "", 0.0  # the trace file's size bounds it
    n = a.rate_per_s * w.duration_s
    return "the expected requests (arrival.rate_per_s x duration_s)", n


def memory_estimate(s: Scenario) -> float:
    """A rough upper estimate of the simulation's own memory in bytes."""
    tokens, _ = routed_tokens(s)
    m = s.model
    depth = m.experts if s.policies.overflow == "reroute" else m.top_k
    routing = tokens * max(depth, m.top_k) * 40.0 + m.experts * len(m.moe_layer_indices) * 8.0
    devices = s.cluster.devices
    paths = devices * devices * 8.0 * max(4.0, math.log2(max(2, devices)))
    serving = 0.0
    if isinstance(s.workload, ServingWorkload):
        _, n = requests(s.workload)
        serving = n * 200.0
    return routing + paths + serving
