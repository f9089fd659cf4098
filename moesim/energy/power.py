"""Per-device power by state: idle, compute-bound, memory-bound, communicating.

Calibrated where measured. For the H100 SXM the catalog's ``power`` block (and ``idle_w``)
holds the board powers of ``moesim/catalog/measurements/h100_sxm_primitives.jsonl``
(format: ``/work/shared/calibration/README.md``), read with the NVML energy counter:

- idle: label ``idle``, 132.55 W (nothing running);
- compute-bound: label ``gemm8192_bf16``, 699.22 W (sustained 8192^3 bf16 products);
- memory-bound: label ``d2d_copy_2GiB``, 417.69 W (sustained device-to-device copies).

For the H200 SXM the ``power`` block holds the board powers of
``moesim/catalog/measurements/h200x2_power_2026-11-22.jsonl`` (``python3 -m
moesim.calibrate.torch_power`` on two NVLinked H200s, NVML energy counter, both GPUs in the
same state, two runs; see docs/energy.md), communicating included:

- idle: label ``idle_ctx``, 120.41 W (CUDA context and NCCL up, no kernel; 76.44 W with
  no process at all, label ``idle``);
- compute-bound: label ``gemm_bf16``, 691.52 W; memory-bound: label ``d2d_copy``, 561.44 W;
- communicating: label ``all_to_all``, 353.24 W (NCCL all-to-all of 512 MiB per rank over
  NVLink; the 512 MiB all-reduce drew 315.32 W, a 16 MiB all-to-all 228.18 W).

Communicating is measured where a preset's ``power.communicating_w`` is given (the H200).
Elsewhere it is assumed to draw the memory-bound power (collectives stream buffers through
HBM and the links' DMA engines): the H100 keeps that assumption, not measured on an H100;
the H200 measurement suggests it overstates (all-to-all 0.63 x the memory-bound power).

For an accelerator without a ``power`` block, the assumption is the H100's measured busy
powers as the same fractions of TDP (compute 699.22 / 700, memory 417.69 / 700, taken from
the h100-sxm preset, not restated here), times the device's ``tdp_w``; idle is the
preset's own ``idle_w`` (cited per preset). A busy power is never below idle.

Pure functions and frozen dataclasses; no I/O beyond the cached catalog lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moesim.config.hardware import AcceleratorSpec

State = Literal["idle", "compute", "memory", "communicating"]
STATES: tuple[State, ...] = ("idle", "compute", "memory", "communicating")
"""Device states, in the order every per-state table uses."""

REFERENCE_PRESET = "h100-sxm"
"""The preset whose measured powers calibrate the TDP fractions of unmeasured devices."""
MEASUREMENT_FILE = "moesim/catalog/measurements/h100_sxm_primitives.jsonl"


@dataclass(frozen=True)
class DevicePower:
    """Board power of one device in each state, watts, and where the figures come from."""

    idle_w: float
    compute_w: float
    memory_w: float
    communicating_w: float
    source: str
    """The calibration or assumption behind the figures (printed in the summary)."""

    def watts(self, state: State) -> float:
        """Power in ``state``, watts."""
        return float(getattr(self, f"{state}_w"))

    def as_dict(self) -> dict[str, float]:
        """``{state: watts}`` for every state."""
        return {st: self.watts(st) for st in STATES}


def _reference() -> AcceleratorSpec:
    from moesim.catalog.hardware import accelerator

    return accelerator(REFERENCE_PRESET)


def device_power(acc: AcceleratorSpec) -> DevicePower:
    """The power model of ``acc``: its measured ``power`` block, else H100 TDP fractions."""
    if acc.power is not None:
        p = acc.power
        comm = p.communicating_w
        comm_note = (
            "communicating: measured (see source)"
            if comm is not None
            else "communicating: assumed = memory-bound power (not measured)"
        )
        return DevicePower(
            idle_w=acc.idle_w,
            compute_w=p.compute_w,
            memory_w=p.memory_w,
            communicating_w=comm if comm is not None else p.memory_w,
            source=(
                f"{acc.name}: measured; idle = idle_w "
                f"({acc.sources.get('idle_w', acc.source)}); {p.source}; {comm_note}"
            ),
        )
    ref = _reference()
    if ref.power is None:  # pragma: no cover - the catalog ships it
        raise ValueError(f"the {REFERENCE_PRESET} preset has no measured power block")
    compute_frac = ref.power.compute_w / ref.tdp_w
    memory_frac = ref.power.memory_w / ref.tdp_w
    compute_w = max(acc.idle_w, compute_frac * acc.tdp_w)
    memory_w = max(acc.idle_w, memory_frac * acc.tdp_w)
    return DevicePower(
        idle_w=acc.idle_w,
        compute_w=compute_w,
        memory_w=memory_w,
        communicating_w=memory_w,
        source=(
            f"{acc.name}: assumed; compute = {compute_frac:.4f} x tdp_w {acc.tdp_w:g} W and "
            f"memory = {memory_frac:.4f} x tdp_w, the {REFERENCE_PRESET} measured "
            f"gemm8192_bf16 / d2d_copy_2GiB powers over its {ref.tdp_w:g} W TDP "
            f"({MEASUREMENT_FILE}); idle = the preset's idle_w ({acc.idle_w:g} W: "
            f"{acc.sources.get('idle_w', acc.source)}); communicating assumed = memory-bound "
            "power (not measured)"
        ),
    )
