"""Two micro-batches on one compute and one communication stream when the communication
kernels take streaming multiprocessors (SMs) from the compute (issue 16).

DeepEP's normal (prefill) kernels run on SMs of their own: ``Buffer.num_sms = 20`` by
default (github.com/deepseek-ai/DeepEP, ``deep_ep/buffer.py``; DeepSeek-V3 report Sec.
3.2.2: 20 of the H800's 132 SMs suffice for the IB and NVLink traffic), so while a
dispatch or combine runs, the compute kernels of the other micro-batch get the remaining
SMs: their progress rate is ``(sms - comm_sms) / sms`` (the compute is taken to scale with
the SMs it has) and full speed otherwise. The low-latency kernels do not hold SMs while
their transfers are in flight (DeepEP README: hook-based overlap, "without occupying any
SM resource"), so they leave the compute alone.

The timeline is :func:`moesim.engine.dual_batch.overlapped_s`'s (the same ops in
DeepSeek's alternating order, each starting when its stream is free and its
micro-batch's previous op has ended), played event by event because a compute op's
duration now depends on what the communication stream does meanwhile. With a rate of 1
it is that function's makespan.
"""

from __future__ import annotations

from typing import Protocol

from moesim.config.hardware import AcceleratorSpec
from moesim.config.parallelism import ParallelismConfig

DEEPEP_NORMAL_SMS = 20
"""SMs DeepEP's normal kernels run on (``deep_ep/buffer.py``: ``Buffer.num_sms = 20``)."""

COMPUTE, COMM = 0, 1


class _Ops(Protocol):
    @property
    def attention_s(self) -> float: ...
    @property
    def dispatch_s(self) -> float: ...
    @property
    def experts_s(self) -> float: ...
    @property
    def combine_s(self) -> float: ...
    @property
    def dense_s(self) -> float: ...
    @property
    def head_s(self) -> float: ...


def compute_rate_during_comm(acc: AcceleratorSpec, p: ParallelismConfig) -> float:
    """The compute's progress rate while the all-to-all runs: ``(sms - 20) / sms`` with
    DeepEP's normal kernels on an accelerator whose SM count is known, else 1."""
    sms = acc.streaming_multiprocessors
    if p.deepep_mode != "normal" or not sms:
        return 1.0
    return (sms - DEEPEP_NORMAL_SMS) / sms


def program(moe_layers: list[bool], a: _Ops, b: _Ops) -> list[tuple[int, int, float]]:
    """The ops ``(micro-batch, stream, seconds)`` in DeepSeek's alternating order."""
    mbs = (a, b)
    ops: list[tuple[int, int, float]] = []
    for moe in moe_layers:
        ops += [(i, COMPUTE, mbs[i].attention_s) for i in (0, 1)]
        if moe:
            ops += [(i, COMM, mbs[i].dispatch_s) for i in (0, 1)]
            ops += [(i, COMPUTE, mbs[i].experts_s) for i in (0, 1)]
            ops += [(i, COMM, mbs[i].combine_s) for i in (0, 1)]
        else:
            ops += [(i, COMPUTE, mbs[i].dense_s) for i in (0, 1)]
    ops += [(i, COMPUTE, mbs[i].head_s) for i in (0, 1)]
    return ops


def shared_overlapped_s(moe_layers: list[bool], a: _Ops, b: _Ops, rate: float) -> float:
    """The makespan of the two micro-batches when compute progresses at ``rate`` while a
    communication op runs (see the module docstring)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"the compute rate during communication is in (0, 1], got {rate}")
    ops = program(moe_layers, a, b)
    queues: tuple[list[int], list[int]] = ([], [])
    prev = [-1] * len(ops)
    last = [-1, -1]
    for j, (mb, stream, _) in enumerate(ops):
        queues[stream].append(j)
        prev[j] = last[mb]
        last[mb] = j
    done = [False] * len(ops)
    head = [0, 0]
    cur = [-1, -1]
    left = [0.0, 0.0]  # compute: work at full speed; communication: seconds
    t = 0.0
    while True:
        for s in (COMPUTE, COMM):
            if cur[s] < 0 and head[s] < len(queues[s]):
                j = queues[s][head[s]]
                if prev[j] < 0 or done[prev[j]]:
                    cur[s], left[s] = j, ops[j][2]
                    head[s] += 1
        if cur[COMPUTE] < 0 and cur[COMM] < 0:
            break
        r = rate if cur[COMM] >= 0 else 1.0
        tc = left[COMPUTE] / r if cur[COMPUTE] >= 0 else float("inf")
        tm = left[COMM] if cur[COMM] >= 0 else float("inf")
        step = tc if tc < tm else tm
        t += step
        for s, ts in ((COMPUTE, tc), (COMM, tm)):
            if cur[s] < 0:
                continue
            if ts <= step:  # this op ends now
                done[cur[s]] = True
                cur[s], left[s] = -1, 0.0
            else:
                left[s] -= step * (r if s == COMPUTE else 1.0)
    if not all(done):  # pragma: no cover - the program order has no cycle
        raise RuntimeError("two-micro-batch timeline stalled")
    return t
