"""Board power of the GPUs of one host by device state: idle, compute-bound (bf16 GEMMs),
memory-bound (device copies) and communicating (NCCL all-to-all and all-reduce).

Run on a machine with one or more CUDA GPUs (two or more for the communicating states)::

    python3 -m moesim.calibrate.torch_power --out power.jsonl

How it measures: a sampler thread in the parent reads each GPU's board power (NVML
``nvmlDeviceGetPowerUsage``, mW) and its energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
mJ) every ``--interval-ms`` (pynvml; without it, ``nvidia-smi --query-gpu=power.draw -lms``
in a subprocess, power only). The phases run in order, each GPU driven by its own process
(``torch.multiprocessing.spawn``, one per GPU, NCCL process group), all GPUs in the same
state at once:

- ``idle``: no process holds a CUDA context (the parent sleeps);
- ``idle_ctx``: the workers hold their contexts, NCCL initialised, and sleep;
- ``gemm_bf16``: back-to-back ``8192 x 8192 x 8192`` bf16 products on random data;
- ``d2d_copy``: back-to-back copies of a 2 GiB buffer;
- ``all_to_all`` / ``all_reduce``: back-to-back NCCL collectives of ``--comm-mib`` MiB per
  rank over the GPUs' links (NVLink on an NV18 pair; the all-reduce averages, so values
  stay finite); ``all_to_all_small``: the same all-to-all of ``--small-mib`` MiB per rank
  (an MoE dispatch's size, where fixed per-call costs weigh); NVLink multicast stays off.

Each loaded phase runs ``--warm-s`` seconds of warm-up and then a window of ``--phase-s``
seconds, whose start and end (host wall clock, after a device synchronise) bound the
samples used. One ``power`` record per phase and GPU: mean and median of the power
samples, the energy counter's joules over the window and their mean watts, sample count,
median SM clock and temperature, plus the work done (TFLOP/s or GB/s). NVML's power reading
on Hopper is a 1 s moving average, so every window starts at least 1.5 s after its load.

Imports only the standard library, numpy-free, and torch, so it runs on bare GPU machines.
``--dry-run`` runs the same phases on the CPU (gloo, small tensors, fake power) to check
the logic without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

PHASES = ("idle_ctx", "gemm_bf16", "d2d_copy", "all_to_all", "all_reduce", "all_to_all_small")
STATE = {
    "idle": "idle",
    "idle_ctx": "idle",
    "gemm_bf16": "compute",
    "d2d_copy": "memory",
    "all_to_all": "communicating",
    "all_reduce": "communicating",
    "all_to_all_small": "communicating",
}


class Sampler:
    """Power (W), energy counter (J), SM clock and temperature of each GPU, timestamped."""

    def __init__(self, gpus: list[int], interval_s: float, fake: bool = False) -> None:
        self.gpus = gpus
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, float, float | None, float | None, float | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self.backend = "fake" if fake else "nvml"
        self.info: dict[str, Any] = {}
        if fake:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in gpus]
            h = self._handles[0]
            name = pynvml.nvmlDeviceGetName(h)
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.info = {
                "name": name.decode() if isinstance(name, bytes) else name,
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "power_limit_w": [
                    pynvml.nvmlDeviceGetEnforcedPowerLimit(x) / 1e3 for x in self._handles
                ],
            }
        except Exception as exc:  # no pynvml or no NVML: nvidia-smi, power only
            self.backend = "nvidia-smi"
            self.info = {"nvml_error": repr(exc)}
            q = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,power.limit",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.splitlines()
            if q:
                parts = [p.strip() for p in q[0].split(",")]
                self.info.update({"name": parts[0], "driver": parts[1]})

    def _nvml_loop(self) -> None:
        nv = self._nvml
        while not self._stop.is_set():
            t = time.time()
            for i, h in zip(self.gpus, self._handles, strict=True):
                try:
                    w = nv.nvmlDeviceGetPowerUsage(h) / 1e3
                    e = nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3
                except Exception:
                    continue
                clk: float | None = None
                temp: float | None = None
                with contextlib.suppress(Exception):
                    clk = float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
                    temp = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                self.samples.append((t, i, w, e, clk, temp))
            self._stop.wait(max(0.0, self.interval_s - (time.time() - t)))

    def _smi_loop(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            parts = [p.strip() for p in line.split(",")]
            try:
                i, w = int(parts[0]), float(parts[1])
                clk, temp = float(parts[2]), float(parts[3])
            except (ValueError, IndexError):
                continue
            if i in self.gpus:
                self.samples.append((time.time(), i, w, None, clk, temp))

    def _fake_loop(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            for i in self.gpus:
                self.samples.append((t, i, 100.0 + i, 100.0 * t, 1000.0, 40.0))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.backend == "nvml":
            target = self._nvml_loop
        elif self.backend == "nvidia-smi":
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,power.draw,clocks.sm,temperature.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={int(self.interval_s * 1000)}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            target = self._smi_loop
        else:
            target = self._fake_loop
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def window(self, gpu: int, t0: float, t1: float) -> dict[str, Any]:
        """Statistics of ``gpu``'s samples with ``t0 <= t <= t1``."""
        rows = [s for s in self.samples if s[1] == gpu and t0 <= s[0] <= t1]
        out: dict[str, Any] = {"samples": len(rows), "seconds": t1 - t0}
        if not rows:
            return out
        watts = [r[2] for r in rows]
        watts_sorted = sorted(watts)
        out.update(
            {
                "mean_w": statistics.fmean(watts),
                "median_w": statistics.median(watts),
                "min_w": watts_sorted[0],
                "max_w": watts_sorted[-1],
                "p10_w": watts_sorted[int(0.1 * (len(watts) - 1))],
                "p90_w": watts_sorted[int(0.9 * (len(watts) - 1))],
            }
        )
        if rows[0][3] is not None and rows[-1][3] is not None and rows[-1][0] > rows[0][0]:
            joules = float(rows[-1][3]) - float(rows[0][3])
            out["energy_j"] = joules
            out["energy_s"] = rows[-1][0] - rows[0][0]
            out["energy_w"] = joules / out["energy_s"]
        clk = [r[4] for r in rows if r[4] is not None]
        temp = [r[5] for r in rows if r[5] is not None]
        if clk:
            out["sm_clock_mhz"] = statistics.median(clk)
        if temp:
            out["temp_c_max"] = max(temp)
        return out


def _worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    dry = cfg["dry_run"]
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(cfg["port"])
    if dry:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)

    def sync() -> None:
        if not dry:
            torch.cuda.synchronize()

    log: list[dict[str, Any]] = []
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    copy_bytes = (1 << 20) if dry else (2 << 30)
    src = torch.randn(copy_bytes // 2, device=dev, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    comm_bytes = (1 << 20) if dry else cfg["comm_mib"] << 20
    cx = torch.randn(comm_bytes // 2, device=dev, dtype=torch.bfloat16, generator=gen)
    cy = torch.empty_like(cx)
    small_bytes = (1 << 16) if dry else cfg["small_mib"] << 20
    sx, sy = cx[: small_bytes // 2], cy[: small_bytes // 2]
    avg = dist.ReduceOp.SUM if dry else dist.ReduceOp.AVG
    flag = torch.zeros(1, device=dev, dtype=torch.int32)
    dist.all_reduce(flag)  # NCCL communicators up before idle_ctx
    sync()
    dist.barrier()

    def run_local(step: Any, check_every: int, seconds: float) -> tuple[int, float, float]:
        t0 = time.time()
        calls = 0
        while True:
            for _ in range(check_every):
                step()
            calls += check_every
            sync()
            t1 = time.time()
            if t1 - t0 >= seconds:
                return calls, t0, t1

    def run_collective(step: Any, check_every: int, seconds: float) -> tuple[int, float, float]:
        t0 = time.time()
        calls = 0
        while True:
            for _ in range(check_every):
                step()
            calls += check_every
            flag.fill_(1 if (rank == 0 and time.time() - t0 >= seconds) else 0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()):
                sync()
                return calls, t0, time.time()

    for phase in cfg["phases"]:
        dist.barrier()
        sync()
        rec: dict[str, Any] = {"phase": phase, "rank": rank}
        if phase == "idle_ctx":
            t0 = time.time()
            time.sleep(cfg["idle_s"])
            rec.update({"t0": t0 + cfg["lag_s"], "t1": time.time()})
        elif phase == "gemm_bf16":

            def gemm() -> None:
                torch.matmul(a, b, out=c)

            run_local(gemm, 10, cfg["warm_s"])
            calls, t0, t1 = run_local(gemm, 10, cfg["phase_s"])
            rec.update({"t0": t0, "t1": t1, "calls": calls})
            rec["tflops"] = 2.0 * n**3 * calls / (t1 - t0) / 1e12
        elif phase == "d2d_copy":

            def copy() -> None:
                dst.copy_(src)

            run_local(copy, 10, cfg["warm_s"])
            calls, t0, t1 = run_local(copy, 10, cfg["phase_s"])
            rec.update({"t0": t0, "t1": t1, "calls": calls})
            rec["gbps_rw"] = 2.0 * copy_bytes * calls / (t1 - t0) / 1e9
        elif phase in ("all_to_all", "all_reduce", "all_to_all_small"):

            def coll(phase: str = phase) -> None:
                if phase == "all_to_all":
                    dist.all_to_all_single(cy, cx)
                elif phase == "all_to_all_small":
                    dist.all_to_all_single(sy, sx)
                else:
                    dist.all_reduce(cx, op=avg)

            if phase == "all_reduce":
                cx.normal_(generator=gen)
            every = 200 if phase == "all_to_all_small" else 20
            run_collective(coll, every, cfg["warm_s"])
            calls, t0, t1 = run_collective(coll, every, cfg["phase_s"])
            rec.update({"t0": t0, "t1": t1, "calls": calls})
            if phase == "all_to_all":
                rec["algbw_gbps"] = comm_bytes * calls / (t1 - t0) / 1e9
                rec["bytes_per_rank"] = comm_bytes
            elif phase == "all_to_all_small":
                rec["algbw_gbps"] = small_bytes * calls / (t1 - t0) / 1e9
                rec["bytes_per_rank"] = small_bytes
            else:
                rec["busbw_gbps"] = 2.0 * (world - 1) / world * comm_bytes * calls / (t1 - t0) / 1e9
                rec["bytes_per_rank"] = comm_bytes
            rec["finite"] = bool(torch.isfinite(cx).all().item()) if phase == "all_reduce" else True
        else:  # pragma: no cover - argparse restricts phases
            raise ValueError(phase)
        log.append(rec)
    dist.barrier()
    with open(os.path.join(cfg["tmp"], f"phases_{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(log, f)
    dist.destroy_process_group()


def summarize(
    sampler: Sampler, windows: list[dict[str, Any]], gpus: list[int], env: dict[str, Any]
) -> list[dict[str, Any]]:
    """One ``power`` record per phase and GPU from the phase windows and the samples."""
    out: list[dict[str, Any]] = []
    for w in windows:
        gpu_list = gpus if w["rank"] is None else [gpus[w["rank"]]]
        for g in gpu_list:
            rec: dict[str, Any] = {
                "kind": "power",
                "state": STATE[w["phase"]],
                "label": w["phase"],
                "gpu": g,
                "name": env.get("name"),
                "driver": env.get("driver"),
                "sampler": sampler.backend,
            }
            rec.update(sampler.window(g, w["t0"], w["t1"]))
            for key in (
                "calls",
                "tflops",
                "gbps_rw",
                "algbw_gbps",
                "busbw_gbps",
                "bytes_per_rank",
                "finite",
            ):
                if key in w:
                    rec[key] = w[key]
            out.append(rec)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True, help="JSONL file to append the records to")
    ap.add_argument("--samples-out", help="optional JSONL of every raw power sample")
    ap.add_argument("--world", type=int, default=0, help="GPUs to use (default: all)")
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--warm-s", type=float, default=5.0)
    ap.add_argument("--phase-s", type=float, default=25.0)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--comm-mib", type=int, default=512)
    ap.add_argument("--small-mib", type=int, default=16)
    ap.add_argument("--port", type=int, default=29531)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--dry-run", action="store_true", help="CPU/gloo, fake power")
    args = ap.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    phases = [p for p in args.phases.split(",") if p]
    for p in phases:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r}; known: {', '.join(PHASES)}")
    if args.dry_run:
        world = args.world or 2
    else:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception:
            count = len(
                subprocess.run(
                    ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
                ).stdout.splitlines()
            )
        world = args.world or count
    if world < 2:
        phases = [p for p in phases if STATE[p] != "communicating"]
        print("torch_power: one GPU, communicating phases skipped", file=sys.stderr)
    gpus = list(range(world))
    sampler = Sampler(gpus, args.interval_ms / 1000.0, fake=args.dry_run)
    env: dict[str, Any] = {
        "kind": "env",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "world": world,
        "torch": torch.__version__,
        "sampler": sampler.backend,
        "interval_ms": args.interval_ms,
        "phase_s": args.phase_s,
        "warm_s": args.warm_s,
        "comm_mib": args.comm_mib,
        "small_mib": args.small_mib,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        **sampler.info,
    }
    if not args.dry_run:
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["smi_topo"] = subprocess.run(
                ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30
            ).stdout
    lag = 0.1 if args.dry_run else 1.5
    sampler.start()
    windows: list[dict[str, Any]] = []
    try:
        t0 = time.time()
        time.sleep(args.idle_s)
        windows.append({"phase": "idle", "rank": None, "t0": t0 + lag, "t1": time.time()})
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "dry_run": args.dry_run,
                "port": args.port,
                "phases": phases,
                "idle_s": args.idle_s,
                "warm_s": args.warm_s,
                "phase_s": args.phase_s,
                "comm_mib": args.comm_mib,
                "small_mib": args.small_mib,
                "lag_s": lag,
                "tmp": tmp,
            }
            mp.spawn(_worker, args=(world, cfg), nprocs=world)
            for rank in range(world):
                with open(os.path.join(tmp, f"phases_{rank}.json"), encoding="utf-8") as f:
                    windows.extend(json.load(f))
    finally:
        sampler.stop()
    order = {name: i for i, name in enumerate(("idle", *PHASES))}
    windows.sort(key=lambda w: (order[w["phase"]], -1 if w["rank"] is None else w["rank"]))
    records = [env, *summarize(sampler, windows, gpus, env)]
    with open(args.out, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if args.samples_out:
        with open(args.samples_out, "w", encoding="utf-8") as f:
            for sample in sampler.samples:
                f.write(json.dumps(sample) + "\n")
    print(f"{'label':<16} {'gpu':>3} {'n':>4} {'mean W':>8} {'median W':>8} {'E/t W':>8} work")
    for r in records[1:]:
        work = next(
            (
                f"{k}={r[k]:.1f}"
                for k in ("tflops", "gbps_rw", "algbw_gbps", "busbw_gbps")
                if k in r
            ),
            "",
        )
        print(
            f"{r['label']:<16} {r['gpu']:>3} {r['samples']:>4} {r.get('mean_w', 0):>8.1f} "
            f"{r.get('median_w', 0):>8.1f} {r.get('energy_w', 0):>8.1f} {work}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
