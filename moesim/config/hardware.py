"""Typed schema of the hardware presets: accelerators, links and switches.

These records are pure data: they hold datasheet and measured figures with their
citations, and do no lookups between presets (a port names its link by string; the loader
puts the spec of every link and switch a cluster names into the cluster's ``links`` and
``switches``, see :mod:`moesim.config.cluster`).

Units follow moesim's convention everywhere: ``_gbps`` is GB/s (gigabytes, 1e9 bytes,
per second), ``_us`` is microseconds, ``_w`` is watts, ``_gib`` is GiB (2**30 bytes),
``tflops`` is 1e12 floating-point operations per second (dense, no sparsity).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from moesim.config.base import Frozen
from moesim.config.profile import DeviceProfile

DType = Literal["bf16", "fp16", "fp32", "tf32", "fp8", "int8"]


def _check_source_keys(model: type[BaseModel], sources: dict[str, str]) -> dict[str, str]:
    """Every key of a ``sources`` mapping must name a field, or a dotted path of fields."""
    for key, value in sources.items():
        if not value.strip():
            raise ValueError(f"sources[{key!r}] is empty: give a citation")
        current: type[BaseModel] | None = model
        for part in key.split("."):
            if current is None or part not in current.model_fields:
                valid = sorted(model.model_fields)
                raise ValueError(
                    f"sources key {key!r} does not name a field of {model.__name__} "
                    f"(fields: {', '.join(valid)}; nested fields as 'field.sub')"
                )
            annotation = current.model_fields[part].annotation
            current = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
    return sources


class PeakTflops(Frozen):
    """Dense (no structured sparsity) peak throughput of one chip, per data type."""

    bf16: float = Field(gt=0)
    """Dense bfloat16 matrix (tensor core / MXU) peak, TFLOP/s."""
    fp16: float = Field(gt=0)
    """Dense float16 matrix peak, TFLOP/s."""
    fp32: float = Field(gt=0)
    """Dense float32 peak (non-tensor FMA units unless stated), TFLOP/s."""
    tf32: float | None = Field(default=None, gt=0)
    """Dense TF32 matrix peak, TFLOP/s; None where the chip has no TF32 mode."""
    fp8: float | None = Field(default=None, gt=0)
    """Dense FP8 matrix peak, TFLOP/s; None where the chip has no FP8 mode."""
    int8: float | None = Field(default=None, gt=0)
    """Dense INT8 matrix peak, tera-operations per second; None where unsupported."""

    def for_dtype(self, dtype: str) -> float:
        """The peak for one data type, in TFLOP/s; ValueError if the chip lacks it."""
        if dtype not in PeakTflops.model_fields:
            raise ValueError(
                f"unknown dtype {dtype!r}; known: {', '.join(PeakTflops.model_fields)}"
            )
        value = getattr(self, dtype)
        if value is None:
            raise ValueError(f"dtype {dtype!r} is not supported by this accelerator")
        return float(value)


class LinkPort(Frozen):
    """A group of identical scale-up links leaving one chip."""

    link: str = Field(min_length=1)
    """Name of the link each of these ports uses (a key of the cluster's ``links``, a
    preset of ``links.yaml`` unless the scenario defines it)."""
    count: int = Field(ge=1)
    """How many such links the chip has, count."""


class Efficiency(Frozen):
    """Achievable fractions of the datasheet peaks, for roofline-style cost models."""

    compute: float = Field(gt=0, le=1)
    """Fraction of peak FLOP/s a large, well-shaped GEMM reaches, dimensionless in (0, 1]."""
    memory: float = Field(gt=0, le=1)
    """Fraction of peak memory bandwidth a streaming copy reaches, dimensionless in (0, 1]."""
    source: str = Field(min_length=1)
    """Where both fractions come from: a measurement file, a paper, or a stated assumption."""


class PowerSpec(Frozen):
    """Measured board power of one chip in its busy states (idle is ``idle_w``).

    Used by :mod:`moesim.energy.power`; a preset without it gets powers scaled from the
    H100 SXM measurement (an assumption the energy summary states).
    """

    compute_w: float = Field(gt=0)
    """Board power while running sustained compute-bound matrix products, watts."""
    memory_w: float = Field(gt=0)
    """Board power while running sustained memory-bound copies, watts."""
    communicating_w: float | None = Field(default=None, gt=0)
    """Board power while driving collectives, watts; None where not measured (the energy
    model then assumes ``memory_w``)."""
    source: str = Field(min_length=1)
    """Where the figures come from: a measurement file and its records."""


class AcceleratorSpec(Frozen):
    """One accelerator chip (GPU or TPU): compute, memory, power and its links."""

    name: str = Field(min_length=1)
    """Preset name, filled from the catalog key."""
    vendor: str = Field(min_length=1)
    """Manufacturer, e.g. NVIDIA, AMD, Google."""
    kind: Literal["gpu", "tpu", "cpu"]
    """Accelerator family."""
    source: str = Field(min_length=1)
    """Main citation: datasheet title and URL or document number."""
    sources: dict[str, str] = Field(default_factory=dict)
    """Per-field citations or stated assumptions, keyed by field name (or 'field.sub')."""
    peak_tflops: PeakTflops
    """Dense peak throughput per data type, TFLOP/s."""
    memory_gib: float = Field(gt=0)
    """Device memory (HBM/GDDR) capacity as marketed, in GiB (2**30 bytes)."""
    usable_memory_gib: float | None = Field(default=None, gt=0)
    """Memory visible to software where measured, GiB; None where not measured."""
    memory_bandwidth_gbps: float = Field(gt=0)
    """Peak device memory bandwidth, GB/s (1e9 bytes per second)."""
    tdp_w: float = Field(gt=0)
    """Thermal design power / board power limit, watts."""
    idle_w: float = Field(ge=0)
    """Board power with nothing running, watts (must be below tdp_w)."""
    ports: tuple[LinkPort, ...] = ()
    """Scale-up links per chip (NVLink / ICI / Infinity Fabric / bridge), by link preset."""
    host_link: str | None = None
    """Link joining the chip to its host CPU, e.g. 'pcie-gen5-x16' (a key of the cluster's
    ``links``); None if unknown."""
    efficiency: Efficiency
    """Achievable fractions of peak compute and memory bandwidth."""
    kernel_overhead_us: float = Field(ge=0)
    """Fixed per-kernel launch overhead, microseconds."""
    streaming_multiprocessors: int | None = Field(default=None, ge=1)
    """GPU streaming multiprocessors (SMs), count; None if not given (then nothing is
    priced from it: communication kernels taking SMs from compute)."""
    profile: DeviceProfile | None = None
    """Measured cost-model profile of this device (a catalog profile name in presets);
    when present it replaces peak x efficiency in the cost model."""
    power: PowerSpec | None = None
    """Measured busy-state board powers (see :mod:`moesim.energy.power`); None where not
    measured."""

    @field_validator("sources")
    @classmethod
    def _sources_name_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_source_keys(cls, value)

    @model_validator(mode="after")
    def _idle_below_tdp(self) -> AcceleratorSpec:
        if self.idle_w >= self.tdp_w:
            raise ValueError(f"idle_w ({self.idle_w} W) must be below tdp_w ({self.tdp_w} W)")
        if self.power is not None:
            p = self.power
            for name in ("compute_w", "memory_w", "communicating_w"):
                value = getattr(p, name)
                if value is not None and not self.idle_w <= value <= self.tdp_w:
                    raise ValueError(
                        f"power.{name} ({value} W) must lie between idle_w ({self.idle_w} W) "
                        f"and tdp_w ({self.tdp_w} W)"
                    )
        return self


LinkKind = Literal[
    "nvlink", "pcie", "infiniband", "roce", "ethernet", "ici", "infinity_fabric", "nvlink_bridge"
]


class LinkSpec(Frozen):
    """One point-to-point link (a single port): bandwidth, latency, energy."""

    name: str = Field(min_length=1)
    """Preset name, filled from the catalog key; in a cluster's ``links``, the entry's key."""
    kind: LinkKind
    """Link technology."""
    source: str = Field(min_length=1)
    """Main citation: specification or datasheet, title and URL or document number."""
    sources: dict[str, str] = Field(default_factory=dict)
    """Per-field citations or stated assumptions, keyed by field name."""
    bandwidth_gbps: float = Field(gt=0)
    """Peak data bandwidth of one port, per direction, GB/s."""
    latency_us: float = Field(ge=0)
    """One hop, one way latency of the link, microseconds."""
    effective_bandwidth_gbps: float | None = Field(default=None, gt=0)
    """Measured achievable bandwidth of one port per direction, GB/s (cited in sources)."""
    energy_pj_per_bit: float | None = Field(default=None, gt=0)
    """Transfer energy, picojoules per bit (cited in sources); None where unpublished."""

    @field_validator("sources")
    @classmethod
    def _sources_name_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_source_keys(cls, value)

    @model_validator(mode="after")
    def _measured_values_are_cited(self) -> LinkSpec:
        for field in ("effective_bandwidth_gbps", "energy_pj_per_bit"):
            if getattr(self, field) is not None and field not in self.sources:
                raise ValueError(f"{field} is given without a citation in sources[{field!r}]")
        eff = self.effective_bandwidth_gbps
        if eff is not None and eff > self.bandwidth_gbps:
            raise ValueError(
                f"effective_bandwidth_gbps: {eff:g} GB/s exceeds bandwidth_gbps "
                f"({self.bandwidth_gbps:g} GB/s): a link delivers at most its datasheet rate"
            )
        return self


class SwitchSpec(Frozen):
    """One switch ASIC or appliance: port count, port bandwidth, latency, power."""

    name: str = Field(min_length=1)
    """Preset name, filled from the catalog key; in a cluster's ``switches``, the entry's key."""
    kind: Literal["nvswitch", "infiniband", "ethernet", "pcie"]
    """Switch technology."""
    source: str = Field(min_length=1)
    """Main citation: datasheet title and URL or document number."""
    sources: dict[str, str] = Field(default_factory=dict)
    """Per-field citations or stated assumptions, keyed by field name."""
    latency_us: float = Field(ge=0)
    """Port-to-port forwarding latency, microseconds."""
    ports: int = Field(ge=1)
    """Number of ports at port_bandwidth_gbps, count."""
    port_bandwidth_gbps: float = Field(gt=0)
    """Bandwidth of one port, per direction, GB/s."""
    power_w: float | None = Field(default=None, gt=0)
    """Typical power of the switch, watts; None where unpublished."""

    @field_validator("sources")
    @classmethod
    def _sources_name_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_source_keys(cls, value)


def source_keys_valid(model: type[BaseModel], sources: dict[str, Any]) -> bool:
    """Whether every key of ``sources`` names a field (or dotted field path) of ``model``."""
    try:
        _check_source_keys(model, {k: str(v) for k, v in sources.items()})
    except ValueError:
        return False
    return True
