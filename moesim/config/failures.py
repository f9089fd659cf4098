"""The ``failures`` section: what breaks during a run and how the system recovers.

- **Device failures**: a time-to-failure process per device, exponential (memoryless,
  the usual MTBF model) or Weibull (shape < 1: infant mortality, > 1: wear-out), both
  parameterized by the mean time between failures of one device; or a failure scheduled
  at a given time. A failed device comes back after ``recovery.spare_swap_s`` when a hot
  spare is free, else after ``recovery.repair_s`` (never within the run when null).
- **Link events**: one device's scale-up ports, its NIC's fabric port, or both, running
  at a fraction of their bandwidth, or down, for a time window.
- **Stragglers**: one device computing ``slowdown`` times slower for a time window.
- **Recovery**: what happens to the tokens of experts on a failed device (fail over to a
  replica, reroute to the token's next choice, or drop), to the requests of a failed
  data-parallel rank (requeued with their KV recomputed, or lost), and, for training,
  checkpoint-restart.

Cross-field checks (device indices, replicas that must fit the device memory, a
checkpoint that needs a training workload) are in :mod:`moesim.loader.rules`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen


class ExponentialFailures(Frozen):
    """Independent exponential times to failure per device (a Poisson process of rate
    1 / MTBF while the device is up)."""

    kind: Literal["exponential"]
    mtbf_hours: float = Field(gt=0)
    """Mean time between failures of one device, hours."""
    devices: list[Annotated[int, Field(ge=0)]] | None = None
    """Devices subject to this process (null = every device)."""


class WeibullFailures(Frozen):
    """Weibull times to failure per device, renewed after each repair; the scale is
    chosen so that the mean is ``mtbf_hours``: scale = MTBF / Gamma(1 + 1 / shape)."""

    kind: Literal["weibull"]
    mtbf_hours: float = Field(gt=0)
    """Mean time between failures of one device, hours."""
    shape: float = Field(gt=0)
    """Weibull shape k (1 = exponential; < 1 early failures; > 1 wear-out)."""
    devices: list[Annotated[int, Field(ge=0)]] | None = None
    """Devices subject to this process (null = every device)."""


class ScheduledFailure(Frozen):
    """One device failing at a given simulated time."""

    kind: Literal["scheduled"]
    device: int = Field(ge=0)
    """Global device id (rank order: tp fastest, then dp, then pp)."""
    at_s: float = Field(ge=0)
    """When it fails, seconds from the start of the run."""


DeviceFailureConfig = Annotated[
    ExponentialFailures | WeibullFailures | ScheduledFailure, Field(discriminator="kind")
]


class LinkEvent(Frozen):
    """A device's links degraded or down over ``[at_s, until_s)``."""

    device: int = Field(ge=0)
    """Global device id whose links are affected."""
    link: Literal["scale_up", "nic", "all"] = "all"
    """scale_up: the device's NVLink / ICI ports; nic: the fabric port of the NIC the
    device uses (shared by the devices behind that NIC); all: both, and the device's
    PCIe / host links."""
    at_s: float = Field(ge=0)
    """Start of the event, seconds."""
    until_s: float | None = None
    """End of the event, seconds (null = until the end of the run)."""
    bandwidth_fraction: float = Field(default=1.0, gt=0, le=1)
    """Share of the links' bandwidth left while degraded."""
    down: bool = False
    """The links carry nothing: traffic takes another route if the topology has one,
    else the device is unreachable and treated as failed until the links return."""

    @model_validator(mode="after")
    def _window(self) -> LinkEvent:
        if self.until_s is not None and self.until_s <= self.at_s:
            raise ValueError(f"until_s: must be > at_s ({self.at_s}), got {self.until_s}")
        if not self.down and self.bandwidth_fraction == 1.0:
            raise ValueError(
                "bandwidth_fraction: a link event needs bandwidth_fraction < 1 or down: true"
            )
        return self


class Straggler(Frozen):
    """A device computing ``slowdown`` times slower over ``[from_s, until_s)``."""

    device: int = Field(ge=0)
    """Global device id."""
    slowdown: float = Field(gt=1)
    """Factor on the device's compute time (1.5 = 50% slower)."""
    from_s: float = Field(default=0.0, ge=0)
    """Start, seconds."""
    until_s: float | None = None
    """End, seconds (null = until the end of the run)."""

    @model_validator(mode="after")
    def _window(self) -> Straggler:
        if self.until_s is not None and self.until_s <= self.from_s:
            raise ValueError(f"until_s: must be > from_s ({self.from_s}), got {self.until_s}")
        return self


class RecoveryConfig(Frozen):
    """How the system reacts to a failed device."""

    on_expert_loss: Literal["replica", "reroute", "drop"] = "drop"
    """Serving: the token-choice slots of experts on a failed device go to the expert's
    replica (on the next EP rank; dropped if it has none or it is down too), to the
    token's next choice among the live experts, or fall to the residual (dropped)."""
    replicas: int | list[Annotated[int, Field(ge=0)]] = Field(default=0)
    """Experts with a standby replica: the N most popular (an int), or a list of expert
    ids. Each replica holds the expert's weights in every MoE block on the next EP rank
    of the same expert-data-parallel group, so it costs device memory."""
    on_rank_loss: Literal["requeue", "lose"] = "requeue"
    """Serving: the requests of a data-parallel rank whose devices failed are requeued on
    the live ranks (their KV is lost and recomputed), or lost."""
    detect_s: float = Field(default=0.0, ge=0)
    """Time to notice a failed device (a health-check or collective timeout), seconds:
    until then the other devices wait on it (serving stalls, training hangs); the spare
    swap or the repair starts once it is noticed."""
    repair_s: float | None = Field(default=None, gt=0)
    """Time to repair or replace a failed device without a spare, seconds (null = not
    within the run)."""
    hot_spares: int = Field(default=0, ge=0)
    """Idle devices ready to take a failed device's place; a repaired device becomes a
    spare again."""
    spare_swap_s: float = Field(default=60.0, ge=0)
    """Time for a hot spare to take over (load weights, rejoin the groups), seconds."""

    @model_validator(mode="after")
    def _replicas(self) -> RecoveryConfig:
        if isinstance(self.replicas, int) and self.replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {self.replicas}")
        if isinstance(self.replicas, list) and len(set(self.replicas)) != len(self.replicas):
            raise ValueError(
                f"replicas: an expert may appear once, got duplicates in {self.replicas}"
            )
        return self


class CheckpointConfig(Frozen):
    """Synchronous checkpoint-restart of a training run: every interval the job stops to
    write the weights and optimizer states; after a failure it waits for the device
    (spare or repair), restarts, and redoes the steps since the last checkpoint."""

    interval_s: float | None = Field(default=None, gt=0)
    """Compute time between checkpoints, seconds (taken at the first step boundary at or
    after it)."""
    interval_steps: int | None = Field(default=None, gt=0)
    """Training steps between checkpoints."""
    write_gbps: float | None = Field(default=None, gt=0)
    """Checkpoint write bandwidth of one host, GB/s (null = the host's NVMe
    ``nvme_write_gbps``); every host writes its share in parallel."""
    write_gbps_source: str = ""
    """Where ``write_gbps`` comes from (a measurement, a datasheet)."""
    restart_s: float = Field(default=0.0, ge=0)
    """Time to restart the job once its devices are back: relaunch, rebuild the process
    groups, read the checkpoint, seconds."""

    @model_validator(mode="after")
    def _one_interval(self) -> CheckpointConfig:
        if (self.interval_s is None) == (self.interval_steps is None):
            raise ValueError(
                "interval_s: give exactly one of interval_s and interval_steps, got "
                + ("both" if self.interval_s is not None else "neither")
            )
        return self


class FailuresConfig(Frozen):
    """Failure events and recovery of a run (serving or training)."""

    devices: list[DeviceFailureConfig] = Field(default_factory=list)
    """Device failure processes and scheduled failures."""
    links: list[LinkEvent] = Field(default_factory=list)
    """Degraded or downed links."""
    stragglers: list[Straggler] = Field(default_factory=list)
    """Slow devices."""
    recovery: RecoveryConfig = RecoveryConfig()
    """What happens after a device fails."""
    checkpoint: CheckpointConfig | None = None
    """Checkpoint-restart (training only)."""
